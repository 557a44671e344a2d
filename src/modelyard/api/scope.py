"""Keys modelyard puts in an ASGI scope: a leaf module, so that the console (which sets one) and
the API's plumbing (which reads it) both depend on it rather than on each other."""

# The web console calls the admin routes in process as its signed-in admin (console/internal):
# the AdminToken rides in the ASGI scope under this key, which no network request can set.
CONSOLE_CALLER = "modelyard.console_caller"
# The batch runner (batch/runner) runs a batch's lines in process as the key that created the
# batch: its key id rides here (api/auth.require_key admits it by id; the key must still be valid).
BATCH_CALLER = "modelyard.batch_caller"
# ...and which line it is: {"batch_id", "line"}, for the request log (api/middleware/request_log).
BATCH_LINE = "modelyard.batch_line"
