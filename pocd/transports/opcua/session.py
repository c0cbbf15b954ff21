"""One connection to an OPC UA server: the only module that talks to asyncua's client.
Some 580 lines, because everything that touches the library stays here.

`OpcuaSession` opens a secure channel and a session (checking the server certificate first,
then the user), resolves node ids and browse paths against the server, creates one
subscription with a monitored item per subscribed point, reads polled points in batches, and
says when the connection is gone (`lost`). It never reconnects: the runner owns that, so
asyncua's own reconnect is off and a lost session is thrown away whole, with its subscription.
It knows nothing of samples or the inbox; values are handed to the callback it is given.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import security_policies
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509

from pocd.errors import DeviceError
from pocd.transports.opcua.config import BrowseName, BrowsePath, NodeIdText, NodeRef, OpcuaSettings
from pocd.transports.opcua.security import (
    AuthenticationFailed,
    SecuritySetupError,
    ServerTrust,
    describe,
    load_client_identity,
    load_password,
)

__all__ = [
    "ConnectionLost",
    "ItemRequest",
    "NodeFault",
    "OpcuaSession",
    "PropertyValues",
    "ValuesCallback",
]

_POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
_MODES = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
_USER_REFUSED = frozenset(
    {
        StatusCodes.BadUserAccessDenied,
        StatusCodes.BadIdentityTokenRejected,
        StatusCodes.BadIdentityTokenInvalid,
        StatusCodes.BadUserSignatureInvalid,
    }
)
_CLIENT_REFUSED = frozenset(
    {
        StatusCodes.BadCertificateUntrusted,
        StatusCodes.BadCertificateInvalid,
        StatusCodes.BadSecurityChecksFailed,
        StatusCodes.BadCertificateUriInvalid,
        StatusCodes.BadCertificateUseNotAllowed,
        StatusCodes.BadCertificateTimeInvalid,
    }
)
# asyncua types its Boolean fields with a placeholder class; on the wire they are bools.
_TRUE = cast("ua.Boolean", True)
_FALSE = cast("ua.Boolean", False)
_OBJECTS = ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder))
_HIERARCHICAL = ua.NodeId(ua.Int32(ObjectIds.HierarchicalReferences))
_HAS_PROPERTY = ua.NodeId(ua.Int32(ObjectIds.HasProperty))

# Values of monitored items: (client handle, DataValue) pairs of one publish response.
ValuesCallback = Callable[[list[ua.MonitoredItemNotification]], Awaitable[None]]


class ConnectionLost(DeviceError):
    """The session is gone: the socket closed, the server stopped answering, or it dropped
    the session or the subscription."""

    def __init__(self, reason: str, *, device: str) -> None:
        self.reason = reason
        super().__init__(reason, device=device, code="connection-lost")


@dataclass(frozen=True, slots=True)
class NodeFault:
    """Why a point's node cannot be used in this session: a status and a message."""

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class ItemRequest:
    """One monitored item to create: a point's node and how it is sampled."""

    handle: int
    node: ua.NodeId
    sampling_interval: float  # seconds
    queue_size: int
    deadband: float
    percent: bool
    timestamp_trigger: bool  # report SourceTimestamp changes too (points with stale_after)


@dataclass(frozen=True, slots=True)
class PropertyValues:
    """The AnalogItem properties of a node, where the server has them."""

    eu_range: tuple[float, float] | None
    units: str | None


def _status_error(exc: BaseException) -> int | None:
    if isinstance(exc, UaStatusCodeError):
        return int(exc.code)
    return None


class OpcuaSession:
    """An open session with one server. Use `open()` then `close()` (or `async with`)."""

    def __init__(self, settings: OpcuaSettings, device: str) -> None:
        self.settings = settings
        self.device = device
        self.client = Client(
            settings.endpoint, timeout=settings.timeout, watchdog_intervall=settings.watchdog
        )
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.last_publish = time.monotonic()
        self.keepalive_limit = math.inf  # seconds without a publish response that mean "lost"
        self._namespaces: list[str] = []
        self._subscription_id: int | None = None
        self._on_values: ValuesCallback | None = None
        self._password: str | None = None
        self._client_cert: x509.Certificate | None = None  # for messages when it is refused

    # --- connecting ---------------------------------------------------------------------------

    async def __aenter__(self) -> OpcuaSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def password(self) -> str | None:
        """The password in use, for scrubbing messages; never to be shown."""
        return self._password

    async def open(self) -> None:
        """Connect: check the server certificate, open the channel, create and activate the
        session. Raises SecuritySetupError, ServerCertificateUntrusted, AuthenticationFailed,
        or the connection's own error (OSError, TimeoutError, UaError)."""
        settings, client = self.settings, self.client
        client.name = client.description = f"pocd {self.device}"
        client.product_uri = "urn:pocd"
        client.session_timeout = round(settings.session_timeout * 1000)
        if settings.security_policy != "None":
            await self._secure()
        else:
            client.application_uri = settings.application_uri or "urn:pocd:client"
        if settings.username is not None:
            self._password = load_password(settings, self.device)
            client.set_user(settings.username)
            client.set_password(self._password or "")
        client.connection_lost_callback = self._connection_lost
        try:
            await client.connect(auto_reconnect=False)
        except UaStatusCodeError as exc:
            self._explain_refusal(exc)
            raise
        self._namespaces = list(await client.get_namespace_array())

    async def _secure(self) -> None:
        settings, client = self.settings, self.client
        identity = load_client_identity(settings, self.device)
        client.application_uri = identity.application_uri
        policy = _POLICIES[settings.security_policy]
        mode = _MODES[settings.mode]
        # The server's certificate comes from its endpoint list, over an unsecured channel,
        # and is judged before a secure channel is opened with it.
        endpoints = await client.connect_and_get_server_endpoints()
        matching = [
            ep for ep in endpoints if ep.SecurityPolicyUri == policy.URI and ep.SecurityMode == mode
        ]
        if not matching:
            offered = sorted(
                {
                    f"{ep.SecurityPolicyUri.rpartition('#')[2]}/{ep.SecurityMode.name}"
                    for ep in endpoints
                }
            )
            raise SecuritySetupError(
                f"the server offers no endpoint with {settings.security_policy}/{settings.mode} "
                f"(it offers: {', '.join(offered) or 'none'})",
                device=self.device,
                code="no-endpoint",
            )
        server_der = _first_certificate(matching[0].ServerCertificate)
        if not server_der:
            raise SecuritySetupError(
                "the server's endpoint carries no certificate", device=self.device
            )
        server_cert = x509.load_der_x509_certificate(server_der)
        trust = ServerTrust(
            Path(settings.server_certificate) if settings.server_certificate else None,
            Path(settings.trust_dir) if settings.trust_dir else None,
            self.device,
        )
        trust.check(server_cert)
        await client.set_security(
            policy,
            certificate=identity.certificate_der,
            private_key=identity.private_key_der,
            server_certificate=server_der,
            mode=mode,
        )
        self._client_cert = x509.load_der_x509_certificate(identity.certificate_der)

    def _explain_refusal(self, exc: UaStatusCodeError) -> None:
        code = int(exc.code)
        name = ua.StatusCode(ua.UInt32(code)).name
        if code in _USER_REFUSED and self.settings.username is not None:
            source = (
                f"the file {self.settings.password_file}"
                if self.settings.password_file
                else f"the environment variable {self.settings.password_env}"
            )
            raise AuthenticationFailed(
                f"the server refused user {self.settings.username!r} ({name}): check the user "
                f"name and the password in {source}",
                device=self.device,
                username=self.settings.username,
                status=name,
            ) from None
        if code in _CLIENT_REFUSED and self.settings.security_policy != "None":
            cert = self._client_cert
            which = describe(cert) if cert is not None else str(self.settings.certificate)
            raise SecuritySetupError(
                f"the server refused this client's certificate ({name}): its administrator must "
                f"trust {self.settings.certificate}, {which}",
                device=self.device,
                code="client-certificate-rejected",
            ) from None

    async def _connection_lost(self, exc: Exception) -> None:
        self.mark_lost(_describe_loss(exc))

    def mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()

    async def close(self) -> None:
        """Close the session (deleting its subscription) or, if it is gone, just the socket."""
        self.client.connection_lost_callback = None
        try:
            await asyncio.wait_for(self.client.disconnect(), self.settings.timeout)
        except (TimeoutError, OSError, UaError):
            self.client.disconnect_socket()
        finally:
            self._password = None

    # --- addressing ---------------------------------------------------------------------------

    def namespace_index(self, namespace: int | str) -> int | NodeFault:
        """The server's index of a namespace given as an index or an alias."""
        if isinstance(namespace, int):
            return namespace
        uri = self.settings.namespaces.get(namespace)
        if uri is None:
            known = ", ".join(sorted(self.settings.namespaces)) or "none"
            return NodeFault(
                StatusCodes.BadBrowseNameInvalid,
                f"namespace alias {namespace!r} is not in the device's namespaces table "
                f"(aliases: {known})",
            )
        return self._uri_index(uri)

    def _uri_index(self, uri: str) -> int | NodeFault:
        try:
            return self._namespaces.index(uri)
        except ValueError:
            return NodeFault(StatusCodes.BadNodeIdInvalid, f"the server has no namespace {uri!r}")

    async def resolve(self, refs: Sequence[NodeRef]) -> list[ua.NodeId | NodeFault]:
        """Node ids for node ids and browse paths, in order; a NodeFault where one fails."""
        found: list[ua.NodeId | NodeFault | None] = [None] * len(refs)
        paths: list[tuple[int, ua.BrowsePath]] = []
        root = self.settings.root_path
        for i, ref in enumerate(refs):
            if isinstance(ref, NodeIdText):
                found[i] = self._node_id(ref)
                continue
            full = ref if ref.absolute or root is None else _join(root, ref)
            if not full.absolute:
                found[i] = NodeFault(
                    StatusCodes.BadBrowseNameInvalid,
                    f"browse path {ref} is relative, and the device has no root path",
                )
                continue
            path = self._browse_path(_OBJECTS, _HIERARCHICAL, full.elements)
            if isinstance(path, NodeFault):
                found[i] = path
            else:
                paths.append((i, path))
        chunk = self.settings.max_nodes_per_read
        for start in range(0, len(paths), chunk):
            batch = paths[start : start + chunk]
            results = await self.client.uaclient.translate_browsepaths_to_nodeids(
                [p for _, p in batch]
            )
            for (i, _), result in zip(batch, results, strict=True):
                found[i] = _target(result, refs[i])
        return [f for f in found if f is not None]

    def _node_id(self, ref: NodeIdText) -> ua.NodeId | NodeFault:
        parsed = ua.NodeId.from_string(ref.text)
        uri = getattr(parsed, "NamespaceUri", None)
        if not uri:
            return ua.NodeId(parsed.Identifier, parsed.NamespaceIndex, parsed.NodeIdType)
        index = self._uri_index(uri)
        if isinstance(index, NodeFault):
            return index
        return ua.NodeId(parsed.Identifier, ua.Int16(index), parsed.NodeIdType)

    def _browse_path(
        self, start: ua.NodeId, reference: ua.NodeId, elements: Sequence[BrowseName]
    ) -> ua.BrowsePath | NodeFault:
        relative = []
        for element in elements:
            index = self.namespace_index(element.namespace)
            if isinstance(index, NodeFault):
                return index
            relative.append(
                ua.RelativePathElement(
                    ReferenceTypeId=reference,
                    IsInverse=_FALSE,
                    IncludeSubtypes=_TRUE,
                    TargetName=ua.QualifiedName(element.name, index),
                )
            )
        return ua.BrowsePath(StartingNode=start, RelativePath=ua.RelativePath(Elements=relative))

    async def analog_properties(self, nodes: Sequence[ua.NodeId]) -> list[PropertyValues]:
        """EURange and EngineeringUnits of AnalogItem nodes (None where missing)."""
        paths = [
            self._property_path(node, name)
            for node in nodes
            for name in ("EURange", "EngineeringUnits")
        ]
        if not paths:
            return []
        results = await self.client.uaclient.translate_browsepaths_to_nodeids(paths)
        targets = [
            r.Targets[0].TargetId if r.StatusCode.is_good() and r.Targets else None for r in results
        ]
        readable = [ua.NodeId(t.Identifier, t.NamespaceIndex, t.NodeIdType) for t in targets if t]
        values = await self.read(readable) if readable else []
        by_target = iter(values)
        raw: list[Any] = []
        for t in targets:
            dv = next(by_target) if t else None
            good = dv is not None and (dv.StatusCode is None or dv.StatusCode.is_good())
            raw.append(dv.Value.Value if good and dv is not None and dv.Value else None)
        out = []
        for i in range(0, len(raw), 2):
            rng, units = raw[i], raw[i + 1]
            eu_range = (float(rng.Low), float(rng.High)) if isinstance(rng, ua.Range) else None
            text = (
                units.DisplayName.Text
                if isinstance(units, ua.EUInformation) and units.DisplayName
                else None
            )
            out.append(PropertyValues(eu_range, text))
        return out

    @staticmethod
    def _property_path(node: ua.NodeId, name: str) -> ua.BrowsePath:
        element = ua.RelativePathElement(
            ReferenceTypeId=_HAS_PROPERTY,
            IsInverse=_FALSE,
            IncludeSubtypes=_FALSE,
            TargetName=ua.QualifiedName(name, 0),
        )
        return ua.BrowsePath(StartingNode=node, RelativePath=ua.RelativePath(Elements=[element]))

    # --- reading ------------------------------------------------------------------------------

    async def read(self, nodes: Sequence[ua.NodeId]) -> list[ua.DataValue]:
        """The values of nodes, in batches of `max_nodes_per_read`, each with its own status."""
        out: list[ua.DataValue] = []
        chunk = self.settings.max_nodes_per_read
        for start in range(0, len(nodes), chunk):
            params = ua.ReadParameters(
                MaxAge=0,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                NodesToRead=[
                    ua.ReadValueId(NodeId=node, AttributeId=AttributeIds.Value)
                    for node in nodes[start : start + chunk]
                ],
            )
            out.extend(await self.client.uaclient.read(params))
        return out

    async def subscribe(
        self, items: Sequence[ItemRequest], on_values: ValuesCallback
    ) -> list[NodeFault | None]:
        """Create the subscription (once) and monitored items; a NodeFault per refused item."""
        self._on_values = on_values
        settings = self.settings
        if self._subscription_id is None:
            interval_ms = settings.publishing_interval * 1000
            keepalive_count = max(1, math.ceil(settings.keepalive / settings.publishing_interval))
            params = ua.CreateSubscriptionParameters(
                RequestedPublishingInterval=interval_ms,
                RequestedLifetimeCount=keepalive_count * 10,
                RequestedMaxKeepAliveCount=keepalive_count,
                MaxNotificationsPerPublish=0,  # no limit: a large device is not slowed down
                PublishingEnabled=True,
                Priority=0,
            )
            created = await self.client.uaclient.create_subscription(params, self._on_publish)
            self._subscription_id = int(created.SubscriptionId)
            keepalive_s = (
                created.RevisedPublishingInterval * created.RevisedMaxKeepAliveCount / 1000
            )
            # Three missed keep-alives, and never less than a request timeout: then it is gone.
            self.keepalive_limit = max(3 * keepalive_s, settings.timeout, 1.0)
            self.last_publish = time.monotonic()
        faults: list[NodeFault | None] = []
        chunk = settings.max_items_per_call
        for start in range(0, len(items), chunk):
            batch = items[start : start + chunk]
            params_items = ua.CreateMonitoredItemsParameters(
                SubscriptionId=self._subscription_id,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=[_item_request(item) for item in batch],
            )
            results = await self.client.uaclient.create_monitored_items(params_items)
            for item, result in zip(batch, results, strict=True):
                status = result.StatusCode
                faults.append(
                    None
                    if status.is_good()
                    else NodeFault(
                        status.value, f"the server refused to monitor {item.node}: {status.name}"
                    )
                )
        return faults

    async def _on_publish(self, result: ua.PublishResult) -> None:
        # Called by asyncua's publish loop for every response, keep-alives included; it awaits
        # this, so a full inbox slows the publish requests down instead of losing values.
        self.last_publish = time.monotonic()
        data = result.NotificationMessage.NotificationData
        if not data:
            return
        for notification in data:
            if isinstance(notification, ua.DataChangeNotification):
                if self._on_values is not None and notification.MonitoredItems:
                    await self._on_values(notification.MonitoredItems)
            elif isinstance(notification, ua.StatusChangeNotification):
                status = notification.Status
                if status is not None and not status.is_good():
                    self.mark_lost(f"the server ended the subscription: {status.name}")

    async def watch_publishing(self) -> None:
        """Mark the session lost when no publish response came for `keepalive_limit`."""
        while not self.lost.is_set():
            await asyncio.sleep(min(1.0, self.keepalive_limit / 4))
            silent = time.monotonic() - self.last_publish
            if silent > self.keepalive_limit:
                self.mark_lost(f"no publish response for {silent:.1f} s")


def _item_request(item: ItemRequest) -> ua.MonitoredItemCreateRequest:
    mfilter = None
    if item.deadband or item.timestamp_trigger:
        mfilter = ua.DataChangeFilter(
            Trigger=(
                ua.DataChangeTrigger.StatusValueTimestamp
                if item.timestamp_trigger
                else ua.DataChangeTrigger.StatusValue
            ),
            DeadbandType=(
                (ua.DeadbandType.Percent if item.percent else ua.DeadbandType.Absolute)
                if item.deadband
                else ua.DeadbandType.None_
            ),
            DeadbandValue=item.deadband,
        )
    return ua.MonitoredItemCreateRequest(
        ItemToMonitor=ua.ReadValueId(NodeId=item.node, AttributeId=AttributeIds.Value),
        MonitoringMode=ua.MonitoringMode.Reporting,
        RequestedParameters=ua.MonitoringParameters(
            ClientHandle=item.handle,
            SamplingInterval=item.sampling_interval * 1000,
            Filter=mfilter,
            QueueSize=item.queue_size,
            DiscardOldest=True,
        ),
    )


def _join(root: BrowsePath, ref: BrowsePath) -> BrowsePath:
    return BrowsePath(root.elements + ref.elements, absolute=True)


def _target(result: ua.BrowsePathResult, ref: NodeRef) -> ua.NodeId | NodeFault:
    if not result.StatusCode.is_good() or not result.Targets:
        return NodeFault(
            result.StatusCode.value,
            f"browse path {ref} is not on the server: {result.StatusCode.name}",
        )
    target = result.Targets[0].TargetId
    return ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)


def _first_certificate(der: bytes | None) -> bytes:
    """The leaf certificate of a DER chain (servers may send their issuers after it)."""
    if len(der or b"") < 2 or der is None:
        return b""
    first = der[1]
    if first < 0x80:  # short form: the length is this byte
        return der[: 2 + first]
    count = first & 0x7F
    return der[: 2 + count + int.from_bytes(der[2 : 2 + count], "big")]


def _describe_loss(exc: BaseException) -> str:
    code = _status_error(exc)
    if code is not None:
        return f"the server answered {ua.StatusCode(ua.UInt32(code)).name}"
    if isinstance(exc, TimeoutError):
        return "the server stopped answering (timeout)"
    text = str(exc) or type(exc).__name__
    return f"connection lost: {text}"


class _ExpectedNoise(logging.Filter):
    """Drops asyncua's log records of what the runner reports itself, once, as an incident:
    the publish request cut off by a lost connection (logged with a traceback), and closing a
    session or channel whose socket is already gone. Every other record passes."""

    _CLOSED = frozenset(
        {
            "close_session was called but connection is closed",
            "close_secure_channel was called but connection is closed",
        }
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if message in self._CLOSED:
            return False
        if message.startswith("Publish iteration crashed") and record.exc_info:
            return not isinstance(record.exc_info[1], OSError | TimeoutError)
        return True


_NOISE = _ExpectedNoise()
for _name in ("asyncua.client.ua_session.UaSession", "asyncua.client.ua_client.UaClient"):
    logging.getLogger(_name).addFilter(_NOISE)
