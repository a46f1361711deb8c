# bearwatch in a container: build in a Rust image, take libonnxruntime.so from the PyPI wheel (the
# same pinned version as scripts/setup-ort.sh), run on Debian slim. Used by docker-compose.yml.

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY tests tests
RUN cargo build --release --locked --bin bearwatch

FROM python:3.11-slim-bookworm AS onnxruntime
COPY scripts/requirements-ort.txt /tmp/
RUN pip install --no-cache-dir "$(grep '^onnxruntime==' /tmp/requirements-ort.txt)" \
    && cp "$(python -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))')"/capi/libonnxruntime.so.* /opt/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /app bearwatch
COPY --from=onnxruntime /opt/libonnxruntime.so.* /opt/onnxruntime/
RUN ln -s /opt/onnxruntime/libonnxruntime.so.* /opt/onnxruntime/libonnxruntime.so
ENV ORT_DYLIB_PATH=/opt/onnxruntime/libonnxruntime.so
COPY --from=build /src/target/release/bearwatch /usr/local/bin/bearwatch
WORKDIR /app
COPY models models
COPY alerts alerts
COPY pipelines pipelines
RUN mkdir -p /data && chown bearwatch /data
USER bearwatch
# Dashboard, API and /metrics; Postgres wire protocol.
EXPOSE 9464 5433
ENTRYPOINT ["bearwatch"]
CMD ["run"]
