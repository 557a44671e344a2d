"""The console's pages under /console, a module each with its own router; `ROUTERS`, which
console.mount includes.

Reads need a session (any admin token's); a change needs a session, its CSRF token and the admin
role (console/guard's dependencies, checked before a body is read), and is then made through the
admin API in process (console/internal), so the API's own validation, role check and audit log
apply. Action answers are fragments htmx swaps in, read back from server state; messages go to
the page's #flash region (out of band).
"""

from __future__ import annotations

from . import batches, endpoints, keys, live, models, playground, sign_in, usage

ROUTERS = tuple(page.router for page in (sign_in, endpoints, live, playground, keys, usage, models, batches))
