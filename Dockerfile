# cochlea container image.
#
#   docker build -t cochlea .
#   docker run -p 8080:8080 -v "$PWD/recordings:/data/recordings" cochlea
#
# The server runs as uid 10001 and writes to /data/recordings: a bind-mounted
# host directory must be writable by that uid (see README.md, "Docker").

# ---- build ------------------------------------------------------------------
FROM rust:1-slim-bookworm AS builder

# cmake, pkg-config and a C toolchain: the bundled libopus needs them.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cmake pkg-config build-essential \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies first, against placeholder sources, so this layer is rebuilt
# only when Cargo.toml or Cargo.lock change. benches/ is copied because
# Cargo.toml declares a [[bench]] target, and cargo refuses a manifest whose
# declared targets are missing (even for a build that does not compile them).
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The real sources. COPY keeps their original modification times, which are
# older than the placeholder build: touch the crate roots, or cargo would think
# the placeholder binary is up to date and ship it.
# The microphone page is compiled into the binary from samples/web.
COPY src ./src
COPY samples/web ./samples/web
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && cp target/release/cochlea /usr/local/bin/cochlea

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: HTTPS speech-to-text backends are verified against the
# system's trust store.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 cochlea \
 && useradd --system --uid 10001 --gid cochlea --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin cochlea \
 && mkdir -p /data/recordings \
 && chown -R cochlea:cochlea /data

COPY --from=builder /usr/local/bin/cochlea /usr/local/bin/cochlea

ENV COCHLEA_LISTEN=0.0.0.0:8080 \
    COCHLEA_RECORDINGS_DIR=/data/recordings

USER cochlea
WORKDIR /data
VOLUME ["/data/recordings"]
# 8080/udp: WebRTC media (WHIP, transport webrtc), one port for every peer;
# behind NAT also set COCHLEA_WEBRTC_PUBLIC_IP.
EXPOSE 8080 8080/udp

# `cochlea healthcheck` is a plain HTTP GET built into the binary (no curl in
# the image). If you change COCHLEA_LISTEN's port, override this too.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["cochlea", "healthcheck", "--url", "http://127.0.0.1:8080/healthz"]

# On SIGTERM the server stops accepting, finishes every session's recording
# (up to shutdown_timeout_ms, default 10 s) and exits. Give `docker stop` more
# than that (e.g. `docker stop -t 15`), or it kills the process at 10 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cochlea"]
CMD ["serve"]
