"""Network side of the media loader: the SSRF guard and an HTTP GET bounded by one deadline.

Design decisions:
* **Check the address, then connect to exactly that address.** A host name is resolved once,
  every resolved address must be public (`blocked_reason`), and the TCP connection goes to the
  checked IP (TLS still verifies the certificate for the host name). A DNS answer that changes
  between check and connect (DNS rebinding) therefore cannot reach a private address. Redirects
  are followed by hand, each hop re-checked the same way, up to `max_redirects`.
* **Numeric disguises are normalised before the check**: `127.1`, `2130706433`, `0x7f000001`,
  `[::1]`, IPv4-mapped / NAT64 / 6to4 IPv6 all reduce to the IPv4 address they reach.
* **One wall-clock deadline per fetch** (`fetch_timeout_s`, all hops together): DNS runs in a
  daemon thread the caller stops waiting for, connect and the TLS handshake get the time left,
  and every later send / recv (status line, headers, body) goes through `_DeadlineSocket`,
  which sets the socket timeout to the time left before each call. A server trickling one byte
  a second therefore cannot stretch a fetch past the deadline: per-read timeouts alone would
  let it, since every read succeeds.
* No third-party HTTP client: `http.client` with a pinned socket is small enough to audit.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
from urllib.parse import urljoin, urlsplit

from .mediapolicy import MediaError, MediaPolicy, byte_limit, too_big

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Ranges Python's `is_global` does not flag but no image server lives in.
_EXTRA_BLOCKED = [ipaddress.ip_network(n) for n in ("100.64.0.0/10", "192.0.0.0/24", "0.0.0.0/8")]
# Lookups that may hang at once; a hung resolver cannot pile up threads beyond this.
_DNS_SLOTS = threading.BoundedSemaphore(16)


def timed_out(what: str) -> MediaError:
    return MediaError(
        f"{what} download timed out: the whole fetch (DNS, connect, headers, body, redirects) "
        "must finish within the server's --fetch-timeout",
        status=400,
        code="media_timeout",
    )


def time_left(deadline: float | None, what: str = "image") -> float | None:
    """Seconds until `deadline` (None = no deadline); raises the timeout error once it passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise timed_out(what)
    return left


def _getaddrinfo(host: str, port: int, deadline: float | None, what: str) -> list:
    """`socket.getaddrinfo` that returns by `deadline`: the OS resolver has no timeout of its
    own, so it runs in a daemon thread that is abandoned (not waited for) when time runs out."""
    if deadline is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not _DNS_SLOTS.acquire(timeout=time_left(deadline, what)):
        raise timed_out(what)
    box: dict = {}
    done = threading.Event()

    def work() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            box["error"] = e
        finally:
            _DNS_SLOTS.release()
            done.set()

    threading.Thread(target=work, name="fastvlm-dns", daemon=True).start()
    if not done.wait(time_left(deadline, what)):
        raise timed_out(what)
    if "error" in box:
        raise box["error"]
    return box["infos"]


# ---------------------------------------------------------------------- SSRF decision
def parse_ip(host: str) -> IPAddress | None:
    """An IP literal in any spelling the OS resolver would accept → the address; else None.

    `inet_aton` accepts the legacy forms (`127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1`)
    that `ipaddress` rejects but `getaddrinfo` happily connects to.
    """
    h = host.strip("[]")
    try:
        return ipaddress.ip_address(h.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(h))
    except (OSError, ValueError):
        return None


def _unwrap(ip: IPAddress) -> IPAddress:
    """IPv6 forms that carry an IPv4 destination → that IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
    return ip


def blocked_reason(ip: IPAddress) -> str | None:
    """Why a connection to `ip` is refused (None = public, allowed)."""
    ip = _unwrap(ip)
    for name in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if isinstance(ip, ipaddress.IPv4Address) and any(ip in n for n in _EXTRA_BLOCKED):
        return "reserved"
    if not ip.is_global:
        return "non-global"
    return None


def host_allowed(host: str, allowed: list[str]) -> bool:
    """`host` is named by --allowed-media-domains (exactly, or as a subdomain of an entry)."""
    h = host.strip("[]").lower().rstrip(".")
    for d in allowed:
        d = d.strip("[]").lower().rstrip(".")
        if d and (h == d or h.endswith("." + d)):
            return True
    return False


def resolve_checked(
    host: str, port: int, policy: MediaPolicy, what: str = "image", deadline: float | None = None
) -> list[IPAddress]:
    """Resolve `host` and return the addresses it is safe to connect to, or raise MediaError.

    Every address the name resolves to must be public (one private answer refuses the whole
    name: a resolver round-robin could otherwise pick it later), unless the host is allowed.
    The lookup ends by `deadline` (time.monotonic()) even when the resolver hangs.
    """
    if not host:
        raise MediaError(f"{what} URL has no host")
    ip = parse_ip(host)
    if ip is not None:
        addrs = [ip]
    else:
        try:
            infos = _getaddrinfo(host, port, deadline, what)
        except (socket.gaierror, UnicodeError, OSError) as e:
            raise MediaError(f"{what} URL host {host!r} could not be resolved ({e})") from e
        addrs = []
        for info in infos:
            a = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if a not in addrs:
                addrs.append(a)
        if not addrs:
            raise MediaError(f"{what} URL host {host!r} has no addresses")
    if host_allowed(host, policy.allowed_media_domains):
        return addrs
    for a in addrs:
        reason = blocked_reason(a)
        if reason:
            raise MediaError(
                f"{what} URL host {host!r} resolves to a {reason} address ({a}); the server only "
                "fetches from public addresses (an operator can allow a host with "
                "--allowed-media-domains)",
                status=400,
                code="media_url_refused",
            )
    return addrs


# ---------------------------------------------------------------------- fetching
def _connect(ip: IPAddress, port: int, timeout: float) -> socket.socket:
    """The one place a socket is opened (tests patch it to prove nothing else connects)."""
    return socket.create_connection((str(ip), port), timeout=timeout)


class _DeadlineReader(io.RawIOBase):
    """The socket's read side for http.client; each read waits at most until the deadline."""

    def __init__(self, sock: socket.socket, deadline: float, what: str) -> None:
        # the socket's own SocketIO keeps the fd open until http.client is done with it
        self._raw = sock.makefile("rb", buffering=0)
        self._sock, self._deadline, self._what = sock, deadline, what

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        self._sock.settimeout(time_left(self._deadline, self._what))
        try:
            return self._raw.readinto(b)
        except TimeoutError:
            raise timed_out(self._what) from None

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What http.client sees as its socket: sends and reads bounded by one deadline."""

    def __init__(self, sock: socket.socket, deadline: float, what: str) -> None:
        self._sock, self._deadline, self._what = sock, deadline, what

    def sendall(self, data) -> None:
        # since Python 3.5 the timeout bounds the whole sendall, not each underlying send
        self._sock.settimeout(time_left(self._deadline, self._what))
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise timed_out(self._what) from None

    def makefile(self, mode: str = "rb", *a, **k):
        assert "r" in mode and "b" in mode, mode  # http.client only reads the response
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline, self._what))

    def close(self) -> None:
        self._sock.close()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked `ip` (not a fresh lookup of `host`) within `deadline`."""

    def __init__(self, host: str, ip: IPAddress, port: int, deadline: float, what: str) -> None:
        super().__init__(host, port, timeout=time_left(deadline, what))
        self._ip, self._deadline, self._what = ip, deadline, what

    def _raw(self) -> socket.socket:
        try:
            return _connect(self._ip, self.port, time_left(self._deadline, self._what))
        except TimeoutError:
            raise timed_out(self._what) from None

    def connect(self) -> None:
        self.sock = _DeadlineSocket(self._raw(), self._deadline, self._what)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    def connect(self) -> None:
        sock = self._raw()
        try:
            # one do_handshake call is bounded as a whole by the socket timeout (CPython _ssl)
            sock.settimeout(time_left(self._deadline, self._what))
            tls = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        except TimeoutError:
            sock.close()
            raise timed_out(self._what) from None
        except BaseException:
            sock.close()
            raise
        self.sock = _DeadlineSocket(tls, self._deadline, self._what)


def fetch_url(
    url: str, policy: MediaPolicy, what: str = "image", deadline: float | None = None
) -> bytes:
    """GET an http(s) URL safely (SSRF guard, redirects re-checked, byte cap, deadline).
    `what` ("image" or "video") picks the byte cap and names the media in errors; `deadline`
    (time.monotonic()) defaults to now + fetch_timeout_s and covers every hop."""
    limit = byte_limit(policy, what)
    if not policy.allow_remote:
        raise MediaError(f"this server does not fetch {what} URLs; send the {what} as a data URL")
    if deadline is None:
        deadline = time.monotonic() + policy.fetch_timeout_s
    for _hop in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise MediaError(f"{what} URL scheme {parts.scheme!r} is not allowed (http/https)")
        if parts.username or parts.password:
            raise MediaError(f"{what} URLs with credentials are not allowed")
        host = parts.hostname or ""
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise MediaError(f"{what} URL has an invalid port: {e}") from e
        ip = resolve_checked(host, port, policy, what, deadline)[0]
        cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, ip, port, deadline, what)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": "fastvlm-server", "Accept": f"{what}/*"}
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                loc = resp.getheader("Location")
                if not loc:
                    raise MediaError(f"{what} URL redirected ({resp.status}) without a Location")
                url = urljoin(url, loc)
                continue
            if resp.status != 200:
                raise MediaError(
                    f"{what} URL answered HTTP {resp.status}", code="media_fetch_failed"
                )
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise too_big(int(length), limit, what)
            buf = bytearray()
            while chunk := resp.read(64 * 1024):
                buf += chunk
                if len(buf) > limit:
                    raise too_big(len(buf), limit, what)
            return bytes(buf)
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:  # a cut-off read can surface as any of these
                raise timed_out(what) from e
            raise MediaError(
                f"{what} URL could not be fetched: {e}", code="media_fetch_failed"
            ) from e
        finally:
            conn.close()
    raise MediaError(f"{what} URL redirected more than {policy.max_redirects} times")
