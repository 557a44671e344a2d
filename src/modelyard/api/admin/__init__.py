"""The admin plane under /api/v1/control: who may call it (auth), and one module per kind of
object it manages (keys, endpoints, the store's models, usage, the audit log)."""
