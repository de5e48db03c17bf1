"""The orchestrator: Stratus control plane (see docs/architecture.md)."""
