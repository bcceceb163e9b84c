# provisiond container image.
#
#   docker build -t provisiond:latest .
#   docker run --rm -p 8600:8600 -e PROVISIOND_TOKEN="$(cat provisiond.token)" \
#     -v "$PWD/config:/etc/provisiond:ro" \
#     -v provisiond-data:/var/lib/provisiond provisiond:latest
#
# The image's config listens on 0.0.0.0:8600 with token = "${PROVISIOND_TOKEN}": without
# the variable the container refuses to start, so a published port is never open to
# anyone. The HEALTHCHECK runs `provisiond health --ready` (no curl in the image).
#
# The config is read from /etc/provisiond/provisioning.toml (mount the directory, not a
# subPath, so that hot reload sees changes); the store lives on the volume at
# /var/lib/provisiond, the working directory, so the default store.path lands there.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# How the binary is linked (packed relocations: less resident memory at every start).
COPY .cargo ./.cargo
COPY src ./src
COPY assets ./assets
COPY benches ./benches
COPY examples ./examples
COPY schema ./schema
# The release profile (Cargo.toml) already strips symbols and links with LTO.
RUN cargo build --release --locked --bin provisiond

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 provisiond \
 && useradd --system --uid 10001 --gid provisiond --home-dir /var/lib/provisiond provisiond \
 && mkdir -p /etc/provisiond /var/lib/provisiond \
 && chown provisiond:provisiond /var/lib/provisiond
COPY --from=build /src/target/release/provisiond /usr/local/bin/provisiond
COPY examples/container/provisioning.toml /etc/provisiond/provisioning.toml
USER provisiond:provisiond
WORKDIR /var/lib/provisiond
VOLUME ["/var/lib/provisiond"]
ENV PROVISIOND_CONFIG=/etc/provisiond/provisioning.toml
EXPOSE 8600
# Reaches the listener of the config (PROVISIOND_CONFIG) with its token; /readyz is 503
# while the store is not open or the sidecar drains.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/provisiond", "health", "--ready", "--timeout", "4s"]
ENTRYPOINT ["/usr/local/bin/provisiond"]
CMD ["run", "--log-format", "json"]
