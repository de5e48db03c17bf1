"""The built-in tenant toystore's app (toystore.md; paas.md, Built-in apps).

    toystore/manifest.json    its manifest: web roles catalog and order, worker
                              roles restocker (catalog/restock.py) and receipts
                              (order/receipts.py)
    toystore/package.txt      what its package holds: this directory, catalog/, order/
    toystore/schema.py        the tables its roles share (they never import each other)

`stratus up` deploys it through the platform API as any tenant deploys an app
(stratus/builtin.py)."""
