"""The customer-service assistant: FAQ answers by hybrid retrieval, memory per customer, human
handoff, masking of personal data, a SQLite store, and its web app (``lmforge support ...``)."""
