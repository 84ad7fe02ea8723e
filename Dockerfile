# ordertrail: a small non-root image with the data dir as a volume.
#   docker build -t ordertrail .
#   docker run -p 8080:8080 -p 50051:50051 -v ordertrail-data:/var/lib/ordertrail \
#     -v $PWD/ordertrail.toml:/etc/ordertrail/ordertrail.toml:ro ordertrail

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so they stay cached while only the sources change.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/ordertrail ordertrail \
    && mkdir -p /var/lib/ordertrail /etc/ordertrail \
    && chown ordertrail /var/lib/ordertrail
COPY --from=build /src/target/release/ordertrail /usr/local/bin/ordertrail
USER ordertrail
ENV ORDERTRAIL_CONFIG=/etc/ordertrail/ordertrail.toml \
    ORDERTRAIL_DATA_DIR=/var/lib/ordertrail \
    ORDERTRAIL_HTTP_ADDR=0.0.0.0:8080 \
    ORDERTRAIL_GRPC_ADDR=0.0.0.0:50051 \
    ORDERTRAIL_ADMIN_ADDR=0.0.0.0:9090
VOLUME /var/lib/ordertrail
EXPOSE 8080 50051 9090
STOPSIGNAL SIGTERM
# Ready = storage works and the service is not shutting down (GET /readyz).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/local/bin/ordertrail"]
CMD ["serve"]
