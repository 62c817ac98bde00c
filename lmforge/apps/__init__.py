"""Applications built on lmforge: ``support``, the customer-service assistant."""
