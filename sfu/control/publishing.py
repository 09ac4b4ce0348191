"""Turning a negotiated publisher offer into producers: shared by WHIP and the room protocol."""

from __future__ import annotations

from collections.abc import Sequence

from sfu.control.negotiation import PublishedTrack
from sfu.control.sdp import EXT_MID, EXT_REPAIRED_RID, EXT_RID, EXT_TRANSPORT_CC
from sfu.media.api import MediaApi, ProducerInfo


def open_producers(
    media: MediaApi,
    transport_id: str,
    tracks: Sequence[PublishedTrack],
    *,
    e2ee_required: bool,
    group: str,
    owner: str,
) -> list[ProducerInfo]:
    """One producer per negotiated track, with the room's E2EE policy attached; the
    transport learns the MID extension id so undeclared SSRCs can be bound (RFC 8843), and the
    transport-wide sequence number's id so it can send congestion feedback. `group` (the room)
    and `owner` (the participant) name the track in active-speaker events."""
    producers = [
        media.add_producer(
            transport_id,
            kind=track.kind,
            mid=track.mid,
            codec=track.codec,
            ext_ids=track.ext_ids,
            ssrc=track.ssrc,
            rtx_ssrc=track.rtx_ssrc,
            rids=track.rids,
            e2ee_required=e2ee_required,
            group=group,
            owner=owner,
        )
        for track in tracks
    ]

    def first(uri: str, simulcast_only: bool = False) -> int | None:
        ids = [
            t.ext_ids[uri] for t in tracks if uri in t.ext_ids and (t.rids or not simulcast_only)
        ]
        return ids[0] if ids else None

    media.set_publisher_extensions(
        transport_id,
        mid=first(EXT_MID),
        rid=first(EXT_RID, simulcast_only=True),
        repaired_rid=first(EXT_REPAIRED_RID, simulcast_only=True),
        transport_cc=first(EXT_TRANSPORT_CC),
    )
    return producers
