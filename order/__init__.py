"""The toy store's order service: atomic orders with gap-free numbers."""
