"""The Stratus dashboard (issue 16; paas.md, Dashboard): tenants, developers
and the operator see and steer the platform in a browser.

Served by `python -m dashboard` (bus.service.serve: gunicorn threads) on
settings.dashboard_port (8086), registered in the ZooKeeper registry as the
service "dashboard", and reached through the gateway at /dashboard/ (the
gateway forwards the path unchanged, so every page is under /dashboard;
the route is public: the dashboard does its own sign-in).

Contract:
- Sign in: a form posts username and password; the dashboard asks the
  platform's token service (POST {gateway}/api/v1/auth/token) and keeps the
  token in its session cookie (HttpOnly, SameSite=Strict, Path=/dashboard,
  Secure over https; see sessions.py). Sign out forgets it. Every form
  carries a per-session CSRF token, checked on every POST (400 otherwise).
- The dashboard acts as the user: every platform call goes through the
  gateway with `Authorization: Bearer <the user's token>` (platform.py), so
  the platform's access rules decide what each account sees and may do. A
  tenant opening another tenant's page gets the platform's 403, as a 403
  page, and none of its data. The charts' data (Prometheus, read server
  side) is scoped by the same rules in views/charts.py.
- Views (views/, one blueprint each), for the roles of the token:
    tenant     its apps, roles, instances with state and restarts, its
               events; scale a role, restart an app, deploy (package and
               manifest); requests/s, error rate, p50/p99 per route, last hour
    developer  the status of every component (views/components.py) and
               their logs, searchable, filtered by request id (views/logs.py)
    admin      all of that for every tenant, plus the DB cluster (members,
               role, term, LSN, lag, elections; reads, writes, lag and
               elections charts), switchover, and tenant creation (the
               generated password shown once)
- Pages are rendered on the server and read without JavaScript; with it,
  their live parts refresh every 3 s from the dashboard's own JSON
  (/dashboard/api/...), and the charts are drawn with uPlot 1.6.32, vendored
  under static/vendor/ with its license. No page loads anything from
  outside the platform (a Content-Security-Policy of 'self' enforces it).
- Settings: STRATUS_GATEWAY_URL (else http://127.0.0.1:$STRATUS_GATEWAY_PORT),
  STRATUS_PROMETHEUS_URL, STRATUS_DASHBOARD_PORT, STRATUS_DASHBOARD_SECRET
  (the session signing key; else generated once in the state directory).
See docs/dashboard.md."""
