"""Table definitions that two components of one tenant share (components never
import each other; bus is the shared library)."""
