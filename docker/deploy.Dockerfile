# stratus/deploy: the Docker stack's one-shot `deploy` service
# (compose/docker-compose.yml). It creates the tenants rideshare and toystore
# and deploys their apps through the orchestrator's API, as `stratus up` does
# (python -m stratus.deploy_builtin).
# The installed stratus package has no repository above it, so the built-in
# apps' directories (rideshare/ and toystore/, with their manifests) and the
# directories their packages hold (listed in <tenant>/package.txt) are copied
# to /opt/stratus-src, read-only for its user.
# Build context: a directory holding src/ (scripts/docker-images.sh stages
# it in .docker-cache/deploy-context from the checkout, without caches):
#   docker build --build-arg APP_IMAGE=stratus/app:latest -f docker/deploy.Dockerfile \
#     -t stratus/deploy:latest .docker-cache/deploy-context
ARG APP_IMAGE=stratus/app:latest
FROM ${APP_IMAGE}
USER root
COPY src/ /opt/stratus-src/
RUN chown -R root:root /opt/stratus-src && chmod -R a+rX,go-w /opt/stratus-src
ENV STRATUS_SOURCE_DIR=/opt/stratus-src
USER stratus
CMD ["python", "-m", "stratus.deploy_builtin"]
