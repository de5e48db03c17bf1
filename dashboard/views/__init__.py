"""The dashboard's views, one Flask blueprint each: auth (sign in and out),
home (each role's first page), tenant (a tenant's apps, events and forms),
logs, components (the developer's status view), cluster (the DB cluster and
switchover), tenants (the admin's accounts) and charts (the charts' data)."""
