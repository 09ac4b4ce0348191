"""Turning a negotiated publisher offer into producers: shared by WHIP and the room protocol."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sfu.control.negotiation import PublishedTrack
from sfu.control.sdp import EXT_MID, EXT_REPAIRED_RID, EXT_RID, EXT_TRANSPORT_CC
from sfu.media.engine import MediaEngine
from sfu.media.simulcast import AnyProducer
from sfu.media.transport import Transport


def open_producers(
    engine: MediaEngine,
    transport: Transport,
    tracks: Sequence[PublishedTrack],
    *,
    e2ee_required: bool,
    on_violation: Callable[[AnyProducer, str], None],
) -> list[AnyProducer]:
    """One producer per negotiated track, with the room's E2EE policy attached; the
    transport learns the MID extension id so undeclared SSRCs can be bound (RFC 8843), and the
    transport-wide sequence number's id so it can send congestion feedback."""
    producers = []
    for track in tracks:
        producer = engine.add_producer(
            transport,
            kind=track.kind,
            mid=track.mid,
            codec=track.codec,
            ext_ids=track.ext_ids,
            ssrc=track.ssrc,
            rtx_ssrc=track.rtx_ssrc,
            rids=track.rids,
        )
        if e2ee_required:
            producer.e2ee_required = True
            producer.on_policy_violation = on_violation
        producers.append(producer)
    mid_ids = [t.ext_ids[EXT_MID] for t in tracks if EXT_MID in t.ext_ids]
    if mid_ids:
        transport.mid_ext_id = mid_ids[0]
    for uri, attr in ((EXT_RID, "rid_ext_id"), (EXT_REPAIRED_RID, "repaired_rid_ext_id")):
        ids = [t.ext_ids[uri] for t in tracks if t.rids and uri in t.ext_ids]
        if ids:
            setattr(transport, attr, ids[0])
    twcc_ids = [t.ext_ids[EXT_TRANSPORT_CC] for t in tracks if EXT_TRANSPORT_CC in t.ext_ids]
    if twcc_ids:
        transport.enable_twcc(twcc_ids[0])
    return producers
