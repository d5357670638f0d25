"""`longbow lsp`: command-line arguments and the config -> ServerSettings, then stdio.

stdout is the LSP channel: nothing else may write to it (logs go to stderr, key=value, warnings only
unless -v). The gateway's address and token default to the same config the server and SDK read
(`--config` / LONGBOW_CONFIG, LONGBOW_HOST, LONGBOW_PORT, LONGBOW_AUTH_TOKEN).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# Where Debian/Ubuntu, Fedora/RHEL and macOS (Homebrew OpenSSL) keep the system's CA bundle.
SYSTEM_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


def settings_from(args, config):
    from longbow.services.lsp.gateway_link import GatewaySettings
    from longbow.services.lsp.server import ServerSettings

    host = "127.0.0.1" if config.gateway.host in ("0.0.0.0", "::", "") else config.gateway.host
    address = args.address or f"{host}:{config.gateway.port}"
    gateway = GatewaySettings(address=address, token=args.token or config.gateway.auth_token,
                              root_certificates=_root_certificates(args, config))
    return ServerSettings(gateway=gateway, max_tokens=args.max_tokens, error_rounds=args.error_rounds,
                          inline_mode=args.inline)


def _root_certificates(args, config) -> bytes | None:
    if not (args.tls or args.tls_ca):
        return None
    # A gateway's own self-signed certificate (LONGBOW_TLS_CERT on the same machine) is its own CA.
    for candidate in (args.tls_ca, config.gateway.tls_cert, *SYSTEM_CA_BUNDLES):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_bytes()
    raise SystemExit("error: --tls needs a CA bundle: pass --tls-ca FILE")


def run(args, config) -> int:
    from longbow.services.lsp.server import run_stdio

    settings = settings_from(args, config)
    # The CLI configured the root logger for stderr already; pygls is chatty at INFO.
    logging.getLogger("pygls").setLevel(max(logging.getLogger().level, logging.WARNING))
    print(f"longbow lsp: gateway {settings.gateway.address}", file=sys.stderr)
    return run_stdio(settings)
