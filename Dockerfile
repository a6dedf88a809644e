# syntax=docker/dockerfile:1
# The operator image: one static binary on an empty base (FROM scratch), running as 65532:65532.
#
#   docker build -t ghcr.io/mde-isolation-operator/mde-isolation-operator:0.1.0 .
#
# That tag is the chart's default image (image.repository, tag = appVersion). Stage 1 builds the
# binary with the Rust toolchain image, statically linked against glibc (crt-static: no shared
# library, no loader; name resolution uses glibc's built-in files and dns lookups, so no NSS
# module is needed); stage 2 holds nothing else but the CA bundle. Without a container engine,
# scripts/build-image.sh builds the same image with buildah from a binary built on the host
# (Containerfile.local), with no base-image pull.

# The toolchain the project is tested with (rust-version in Cargo.toml is the minimum).
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# Set by BuildKit (and by buildah/podman with --platform) for the platform being built; native
# builds only. Unset, the build machine's architecture is used.
ARG TARGETARCH
WORKDIR /src
COPY . .
ENV RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_TERM_COLOR=never
# Build, then refuse a binary that would need a dynamic loader (the empty base has none).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eu; \
    arch="${TARGETARCH:-$(uname -m)}"; \
    case "$arch" in \
      amd64|x86_64) target=x86_64-unknown-linux-gnu ;; \
      arm64|aarch64) target=aarch64-unknown-linux-gnu ;; \
      *) echo "unsupported architecture $arch" >&2; exit 1 ;; \
    esac; \
    cargo build --release --locked --target "$target" --bin mde-isolation-operator; \
    install -D -s -m 0555 "target/$target/release/mde-isolation-operator" /out/mde-isolation-operator; \
    if readelf -l /out/mde-isolation-operator | grep -q 'Requesting program interpreter'; then \
      echo "mde-isolation-operator is dynamically linked" >&2; exit 1; \
    fi; \
    /out/mde-isolation-operator --version

FROM scratch
LABEL org.opencontainers.image.title="mde-isolation-operator" \
      org.opencontainers.image.description="Kubernetes operator for Microsoft Defender for Endpoint device isolation" \
      org.opencontainers.image.licenses="Apache-2.0"
# CA bundle for TLS to the MDE API and Entra ID (extra CAs: the chart's mde.caConfigMap).
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/mde-isolation-operator /mde-isolation-operator
# Non-root, numeric (there is no /etc/passwd), matching the chart's securityContext.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/mde-isolation-operator"]
CMD ["run"]
