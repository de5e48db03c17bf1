"""The one shared library of Stratus: settings, names, wire protocol, queue
topology, the DB client, and the ZooKeeper paths and service registry.

Every component imports bus; bus imports no component."""
