# The fhir-sync image: `docker build -t fhir-sync .`, then `docker run fhir-sync` runs `serve`
# (or pass another command, e.g. `run <job>`). `serve` needs an API token for its ops server:
# `docker run -e FHIR_SYNC_OPS__API_TOKEN=... -e FHIR_SYNC_DATABASE__URL=... fhir-sync`.
#
# Two stages: the Rust toolchain builds a release binary, and a slim Debian of the same release
# (bookworm, so the binary's glibc matches) runs it as an unprivileged user. The image holds no
# credentials: private keys, database passwords and API tokens are mounted or passed at run time.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# sqlx's query macros must use the prepared query data in the repository, never a live database
# (.cargo/config.toml says the same; this keeps it true if that file is ever left out).
ENV SQLX_OFFLINE=true
COPY . .
# Migrations are embedded in the binary at compile time, which is why they are not copied below.
RUN cargo build --release --locked --bin fhir-sync

FROM debian:bookworm-slim
# reqwest verifies TLS with the platform verifier, which reads the operating system's CA bundle.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 fhir-sync \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin fhir-sync
COPY --from=build /src/target/release/fhir-sync /usr/local/bin/fhir-sync
# How the service runs (config/) and what it syncs (jobs/); both can be replaced by mounts.
COPY config/ /app/config/
COPY jobs/ /app/jobs/
WORKDIR /app
USER 10001:10001
# The ops HTTP server (health, readiness, the client's JWKS, the status API, metrics and page)
# must be reachable from outside the container. Beyond loopback it requires an API token, so
# `serve` refuses to start without one: pass FHIR_SYNC_OPS__API_TOKEN, or mount a file and set
# FHIR_SYNC_OPS__API_TOKEN_FILE. /healthz, /readyz and the JWKS stay anonymous for probes.
ENV FHIR_SYNC_OPS__LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["fhir-sync"]
# The scheduler and queue workers; run as many containers as you like against one database.
CMD ["serve"]
