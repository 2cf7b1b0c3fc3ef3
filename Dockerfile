# Builds small, static, non-root images for kas and agentk:
#   docker build --target kas    -t kas .
#   docker build --target agentk -t agentk .
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/kas ./cmd/kas && \
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/agentk ./cmd/agentk

FROM gcr.io/distroless/static-debian12:nonroot AS kas
COPY --from=build /out/kas /usr/local/bin/kas
USER nonroot:nonroot
EXPOSE 8150 8151 8153 8155
ENTRYPOINT ["/usr/local/bin/kas"]
CMD ["run", "--configuration-file", "/etc/kas/kas.yaml"]

FROM gcr.io/distroless/static-debian12:nonroot AS agentk
COPY --from=build /out/agentk /usr/local/bin/agentk
USER nonroot:nonroot
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/agentk"]
