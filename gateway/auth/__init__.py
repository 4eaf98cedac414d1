"""Who is calling, one module per job.

* ``identity.py``: the caller's :class:`~.identity.Identity`, the scopes, and the context
  variable the rest of a call reads it from (free of gRPC);
* ``keys.py``: API keys and the key file (``fashionserve keys create``), which also maps
  client certificates to tenants;
* ``certificates.py``: the names of a call's client certificate (mutual TLS);
* ``tokens.py``: JWT bearer tokens verified against a JWKS file;
* ``watched.py``: the key file, the JWKS and the TLS files are re-read when they change;
* ``tls.py``: TLS credentials for the listening port (optionally mutual), the certificate
  renewed without a restart;
* ``interceptor.py``: the interceptor that authenticates every call before its handler.
"""
