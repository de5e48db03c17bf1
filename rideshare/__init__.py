"""The built-in tenant rideshare's app (rideshare.md; paas.md, Built-in apps).

    rideshare/manifest.json   its manifest: web roles users and rides
    rideshare/package.txt     what its package holds: this directory, users/, rides/
    rideshare/schema.py       the tables its roles share (they never import each other)

`stratus up` deploys it through the platform API as any tenant deploys an app
(stratus/builtin.py); the roles' code is in users/ and rides/."""
