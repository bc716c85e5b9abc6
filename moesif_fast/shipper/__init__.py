"""The shipper process: drains the shared-memory ring and sends batches to the Moesif collector."""
