"""The pynetdicom internals ``ingest/listener/transport.py`` relies on are still there, as they were.

pynetdicom is pinned to one exact version in ``pyproject.toml``. When that pin
moves, these tests say which internal changed, and that ``transport.py`` is
the module to review.
"""

from __future__ import annotations

import inspect
import re
import tomllib
import warnings
from pathlib import Path

import pynetdicom
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler, ThreadedAssociationServer

ROOT = Path(__file__).resolve().parents[2]


def _fail(what: str) -> str:
    return (f"pynetdicom {pynetdicom.__version__}: {what} changed; ingest/listener/transport.py relies on it "
            "(review transport.py before moving the pynetdicom pin in pyproject.toml)")


def _params(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def _source(function: object) -> str:
    return inspect.getsource(function)  # type: ignore[arg-type]


def test_pynetdicom_is_the_pinned_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [dep for dep in project["dependencies"] if re.match(r"pynetdicom\b", dep)]
    assert pins == [f"pynetdicom=={pynetdicom.__version__}"], _fail(f"the installed version (pins: {pins})")


def test_socket_reads_are_two_recv_calls_per_pdu() -> None:
    # ListenerSocket bounds recv(nr_bytes) by the negotiated maximum: the DUL must ask for the 6-byte header,
    # then for exactly the PDU length it declared, and check readiness through AssociationSocket.ready
    read = _source(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in read and "self.socket.recv(pdu_length)" in read, _fail("DUL._read_pdu_data")
    assert "self.socket.ready" in _source(DULServiceProvider._is_transport_event), _fail("DUL._is_transport_event")
    assert _params(AssociationSocket.recv) == ["self", "nr_bytes"], _fail("AssociationSocket.recv")
    assert isinstance(inspect.getattr_static(AssociationSocket, "ready"), property), _fail("AssociationSocket.ready")
    assert "self.socket" in _source(AssociationSocket.__init__), _fail("AssociationSocket.socket")


def test_request_handler_creates_and_starts_the_association() -> None:
    assert _params(RequestHandler._create_association) == ["self"], _fail("RequestHandler._create_association")
    create = _source(RequestHandler._create_association)
    for needed in ("AssociationSocket(assoc, client_socket=self.request)", "assoc.set_socket(sock)",
                   "assoc.acceptor.maximum_length"):
        assert needed in create, _fail(f"RequestHandler._create_association ({needed})")
    handle = _source(RequestHandler.handle)
    assert "self._create_association()" in handle and "assoc.start()" in handle, _fail("RequestHandler.handle")
    # the acceptor reads its A-ASSOCIATE-RQ through the DUL, i.e. through our socket's replay
    assert "self.dul.receive_pdu(wait=True, timeout=self.acse_timeout)" in _source(Association.run_reactor), \
        _fail("Association.run_reactor")
    assert callable(getattr(DULServiceProvider, "idle_timer_expired", None)), _fail("DUL.idle_timer_expired")


def test_dimse_provider_hooks() -> None:
    assert _params(DIMSEServiceProvider.__init__) == ["self", "assoc"], _fail("DIMSEServiceProvider.__init__")
    assert _params(DIMSEServiceProvider.receive_primitive) == ["self", "primitive"], \
        _fail("DIMSEServiceProvider.receive_primitive")
    assert _params(DIMSEServiceProvider.get_msg) == ["self", "block"], _fail("DIMSEServiceProvider.get_msg")
    assert _params(DIMSEServiceProvider.send_msg) == ["self", "primitive", "context_id"], \
        _fail("DIMSEServiceProvider.send_msg")
    receive = _source(DIMSEServiceProvider.receive_primitive)
    # a complete message resets self.message to None: ListenerDIMSE detects completion that way
    assert "self.message = None" in receive and "decode_msg(primitive" in receive, \
        _fail("DIMSEServiceProvider.receive_primitive")
    assert "is_valid_request" in _source(Association._serve_request), _fail("Association._serve_request")
    message = C_STORE_RQ()
    assert hasattr(message, "data_set") and hasattr(message, "command_set"), _fail("C_STORE_RQ.data_set/command_set")


def test_server_hooks() -> None:
    assert issubclass(ThreadedAssociationServer, AssociationServer), _fail("ThreadedAssociationServer")
    assert _params(AssociationServer.__init__) == [
        "self", "ae", "address", "ae_title", "contexts", "ssl_context", "evt_handlers", "request_handler"
    ], _fail("AssociationServer.__init__")
    assert "**kwargs" in _source(pynetdicom.AE.make_server), _fail("AE.make_server keyword arguments")
    assert "self.ae._servers.remove" in _source(AssociationServer.shutdown), _fail("AssociationServer.shutdown")
    assert hasattr(_config, "LOG_HANDLER_LEVEL"), _fail("_config.LOG_HANDLER_LEVEL")
    assert "gc.collect()" in _source(AssociationServer.service_actions), _fail("AssociationServer.service_actions")


def test_acceptor_contexts_are_deep_copied_and_only_read() -> None:
    # SharedContexts makes the per-association deepcopy of the server's contexts a shallow copy: that is safe
    # only while the copy goes through copy.deepcopy and negotiation never writes to the acceptor's contexts
    assert "deepcopy(self.server.contexts)" in _source(RequestHandler._create_association), \
        _fail("RequestHandler._create_association (deepcopy of the server's contexts)")
    negotiate = _source(negotiate_as_acceptor)
    assert "ac_context" in negotiate and not re.search(r"ac_context\.\w+\s*=[^=]", negotiate), \
        _fail("presentation.negotiate_as_acceptor (writes to the acceptor's contexts)")


def test_uid_checks_are_pure_and_memoized_with_the_same_verdicts() -> None:
    # memoize_uid_checks caches two UID checks: both must still be functions of the text alone
    assert "VALIDATORS" in dir(_config) and "UI" in _config.VALIDATORS, _fail("_config.VALIDATORS['UI']")
    from pydicom import config as pydicom_config
    from pydicom.uid import UID

    from preread.ingest.listener.transport import memoize_uid_checks
    from pynetdicom.utils import set_uid

    uses = _source(set_uid)
    assert '_config.VALIDATORS["UI"](value)' in uses and "value.is_valid" in uses, _fail("utils.set_uid")
    samples = ["1.2.840.10008.1.2.1", "1.2.3", "1.2.03", "1..2", "x" * 70, "1." + "2" * 63, ""]
    uids = [UID(s, pydicom_config.IGNORE) for s in samples]
    with warnings.catch_warnings():  # pynetdicom's validator re-makes each UID, and pydicom warns of the bad ones
        warnings.simplefilter("ignore")
        before = [(u.is_valid, _config.VALIDATORS["UI"](u)) for u in uids]
        memoize_uid_checks()
        memoize_uid_checks()  # idempotent: no cache around the cache
        after = [(u.is_valid, _config.VALIDATORS["UI"](u)) for u in uids]
    assert after == before and after[0] == (True, (True, "")) and after[2][0] is False
    assert getattr(inspect.getattr_static(UID, "is_valid").fget, "memoized", False)
