# pdgate's container image: the gateway and the reference engine are one binary
# (`pdgate serve`, `pdgate engine`). Build: docker build -t pdgate:dev .
# The cargo command is the README's ("Deploy on Kubernetes"); tests/test_chart.py keeps
# the two equal.

FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin pdgate

# glibc 2.36 as in the build stage, libgcc, CA certificates, no shell; uid/gid 65532 (`nonroot`).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/pdgate /usr/local/bin/pdgate
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/pdgate"]
CMD ["serve", "--config", "/etc/pdgate/pdgate.toml"]
