"""The toy store's catalog service: products, their stock, and the restocker."""
