"""The Moesif event shape of moesif-protocol.md §1.4, written out for the tests to check
against (deliberately not imported from the product, so a product mistake fails a test)."""

import re

EVENT_KEYS = ["request", "response", "session_token", "tags", "user_id", "company_id",
              "metadata", "direction", "weight", "blocked_by", "transaction_id"]
REQUEST_KEYS = ["time", "uri", "verb", "headers", "api_version", "ip_address", "body",
                "transfer_encoding"]
RESPONSE_KEYS = ["time", "status", "headers", "body", "ip_address", "transfer_encoding"]
EVENT_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}")
