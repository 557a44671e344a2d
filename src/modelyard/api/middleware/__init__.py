"""The ASGI plumbing around every route, one middleware per module: the browser guard (origin),
body limits, the credential gate (checks before the body is read), the ledger's close, the
disconnect watch, the request log. api/app.py stacks them and says why in that order."""
