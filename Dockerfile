# The fhir-sync image: `docker build -t fhir-sync .`, then `docker run fhir-sync` runs `serve`
# (or pass another command, e.g. `run <job>`). `serve` needs an API token for its ops server:
# `docker run -e FHIR_SYNC_OPS__API_TOKEN=... -e FHIR_SYNC_DATABASE__URL=... fhir-sync`.
# compose.yaml runs it with PostgreSQL and the demo's fake EHR; deploy/kubernetes/ on a cluster.
# scripts/check-deploy.py checks this file against the code (no container engine runs in CI).
#
# Two stages: the Rust toolchain builds a release binary, and a slim Debian of the same release
# (bookworm, so the binary's glibc matches) runs it as an unprivileged user (uid and gid 10001).
# The image holds no credentials: private keys, database passwords and API tokens are mounted or
# passed at run time, and must be readable by uid 10001 (docs/deployment.md says how).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# sqlx's query macros must use the prepared query data in the repository, never a live database
# (.cargo/config.toml says the same; this keeps it true if that file is ever left out).
ENV SQLX_OFFLINE=true
# Dependencies first, in a layer of their own: built from the manifests and empty targets, this
# layer is rebuilt when Cargo.toml or Cargo.lock change, not on every source change, and it holds
# the ~400 compiled crates that make up most of a cold build. The crate's own artifacts are
# removed so that the real sources below are compiled whatever their timestamps.
COPY Cargo.toml Cargo.lock ./
COPY .cargo/ .cargo/
RUN mkdir -p src tests/it && echo 'fn main() {}' > src/main.rs && touch src/lib.rs tests/it/main.rs && cargo build --release --locked --bin fhir-sync \
    && rm -rf src tests target/release/.fingerprint/fhir-sync-* target/release/deps/fhir_sync-* \
        target/release/deps/libfhir_sync-* target/release/fhir-sync
COPY . .
# Migrations are embedded in the binary at compile time, which is why they are not copied below.
RUN cargo build --release --locked --bin fhir-sync

FROM debian:bookworm-slim
# reqwest verifies TLS with the platform verifier, which reads the operating system's CA bundle.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# /keys is where keys are mounted. It belongs to the image's user so that an empty named volume
# mounted there (compose.yaml's `keys`) starts out writable by it: the engine copies the
# directory's owner into a new volume.
RUN groupadd --gid 10001 fhir-sync \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin fhir-sync \
    && install -d -o 10001 -g 10001 -m 0700 /keys
COPY --from=build /src/target/release/fhir-sync /usr/local/bin/fhir-sync
# How the service runs (config/) and the sample job; mount the real jobs/ at /app/jobs
# (.dockerignore keeps a checkout's own jobs/*.toml and keys out of the image).
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
# Liveness of `serve`'s ops server without curl in the image: bash's /dev/tcp sends one request
# to /healthz, and the status line must say 200. Other commands (`run`, `fake-ehr`) have no ops
# server; compose.yaml gives them their own check or none.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["fhir-sync"]
# The scheduler and queue workers; run as many containers as you like against one database.
CMD ["serve"]
