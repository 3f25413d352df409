"""Every error ddpfleet raises for a user to read.

    DdpfleetError                 one line: what, where, and the fix
    ├── InventoryError            bad inventory file or flag (file:line: key: problem; fix)
    ├── SandboxError              sandbox cannot be made here (not root, not Linux, ...)
    ├── NodeError                 something about one node (carries .node)
    │   ├── ConnectError          the node could not be reached
    │   │   ├── Unreachable       timeout, refused, name resolution, lost connection
    │   │   ├── AuthError         the server rejected our key
    │   │   ├── HostKeyUnknown    not in any known_hosts: `invoke trust`
    │   │   └── HostKeyChanged    differs from known_hosts: refused, never overwritten
    │   ├── BecomeError           the login user cannot become root (or the training user)
    │   └── CommandError          a remote command failed (node, command, exit code, stderr tail)
    │       └── CommandTimeout    it ran past its timeout (and was stopped on the node)
    ├── PlanError                 a launch/bootstrap plan that cannot work (refused before acting)
    │   └── Refusals              several: "what failed; nothing was started:" then a line each
    └── RunFailed                 a run failed: its first line names the node and rank, a block
                                  of that rank's last lines follows (the one multi-line error)

SSH and socket exceptions become these at the connection boundary, so nothing outside
`ddpfleet/ssh/` handles the SSH library's or socket's types, or imports that library.
"""

from __future__ import annotations

from ddpfleet.hygiene import clean  # a node's stderr is shown: no escapes reach the terminal


class DdpfleetError(Exception):
    """Base: str(err) is a complete one-line message for the user (block: several lines)."""

    block = False  # the CLI keeps its newlines (each line was cleaned where it was made)


class InventoryError(DdpfleetError):
    pass


class SandboxError(DdpfleetError):
    pass


class PlanError(DdpfleetError):
    pass


class Refusals(PlanError):
    """One problem per line under a first line (`preflight failed; nothing was started:`): every
    node's own line, each cleaned of control characters, so a node's text cannot add lines."""

    block = True


class RunFailed(DdpfleetError):
    """The first line says which node and rank failed first; the lines after it are its last
    output, each cleaned, shown as the block they were (a traceback, a SyntaxError's caret)."""

    block = True


class NodeError(DdpfleetError):
    kind = "error"

    def __init__(self, node: str, message: str):
        self.node = node
        self.message = message
        super().__init__(f"{node}: {message}")


class BecomeError(NodeError):
    kind = "become"


class ConnectError(NodeError):
    kind = "unreachable"


class Unreachable(ConnectError):
    pass


class AuthError(ConnectError):
    kind = "auth"


class HostKeyUnknown(ConnectError):
    kind = "host key unknown"

    def __init__(self, node: str, host: str, fingerprint: str, key_type: str):
        self.host, self.fingerprint, self.key_type = host, fingerprint, key_type
        super().__init__(
            node,
            f"host key unknown ({key_type} {fingerprint} at {host}); "
            f"check it, then run: invoke trust --nodes {node}",
        )


class HostKeyChanged(ConnectError):
    kind = "host key changed"

    def __init__(self, node: str, host: str, expected: str, got: str, known_hosts: str):
        self.host, self.expected, self.got = host, expected, got
        super().__init__(
            node,
            f"HOST KEY CHANGED for {host}: known_hosts has {expected}, the server offers {got}; "
            f"refusing to connect (possible man-in-the-middle). If the node was really "
            f"reinstalled, remove its line from {known_hosts} and run invoke trust",
        )


class CommandError(NodeError):
    def __init__(self, node: str, command: str, exit_code: int | None, stderr: str = ""):
        self.command, self.exit_code, self.stderr = command, exit_code, stderr
        tail = " | ".join(clean(line) for line in stderr.strip().splitlines()[-3:])
        short = command if len(command) <= 80 else command[:77] + "..."
        super().__init__(
            node, f"command failed (exit {exit_code}): {short}" + (f": {tail}" if tail else "")
        )


class CommandTimeout(CommandError):
    kind = "timed out"

    def __init__(self, node: str, command: str, seconds: float, on_node: bool):
        super().__init__(node, command, None)
        short = command if len(command) <= 80 else command[:77] + "..."
        what = (
            "stopped it on the node"
            if on_node
            else "the node stopped answering; check its load and disks"
        )
        self.message = f"timed out after {seconds:g}s ({what}): {short}"
        self.args = (f"{node}: {self.message}",)
