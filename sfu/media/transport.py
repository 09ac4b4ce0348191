"""One client's WebRTC transport on the shared socket: ICE-lite session, DTLS, SRTP, routing.

A publisher transport routes decrypted RTP to its producers by SSRC (learned from the SDP or
from the MID header extension of the first packets). A subscriber transport owns down-tracks
and routes the subscriber's RTCP feedback (NACK, PLI, FIR) to them. Everything is synchronous
and called from the mux's `datagram_received`.
"""

from __future__ import annotations

import enum
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sfu.media.bwe import BandwidthEstimator
from sfu.media.dtls import DtlsServer, DtlsState, Fingerprint
from sfu.media.ice import Address, IceLiteSession
from sfu.media.probe import Prober
from sfu.media.relay import RelayDialer
from sfu.media.rtcp import (
    Fir,
    Nack,
    Pli,
    ReceiverReport,
    SenderReport,
    TransportCC,
    build_bye,
    build_nack,
    build_pli,
    parse_rtcp,
)
from sfu.media.rtp import RtpHeader, parse_header, read_sdes_extension, read_transport_seq
from sfu.media.srtp import MAX_PROTECT_SIZE, SrtpSession
from sfu.media.stats import FORWARD_SAMPLE_EVERY, MediaStats
from sfu.media.twcc import (
    FeedbackMatcher,
    SendLog,
    TransportSeqLog,
    TwccRecorder,
    parse_transport_feedback,
    transport_seq_slot,
)

if TYPE_CHECKING:
    from sfu.media.downtrack import DownTrack
    from sfu.media.producer import Producer
    from sfu.media.router import Attention
    from sfu.media.simulcast import SimulcastProducer

log = logging.getLogger(__name__)

Sendto = Callable[[bytes, Address], None]


# Retired SSRCs remembered per transport; a publisher restarts a handful of times at most.
MAX_RETIRED_SSRCS = 32
# A subscriber's estimate goes into the histogram at most this often (seconds), so that the
# histogram counts subscriber-seconds whatever each one's feedback rate.
BWE_OBSERVE_INTERVAL = 1.0
# Padding bytes per probe packet (RTP allows at most 255).
PADDING_MAX = 240


class TransportState(enum.Enum):
    NEW = "new"  # created, waiting for the client's ICE checks
    CONNECTING = "connecting"  # ICE done, DTLS handshake running
    CONNECTED = "connected"  # SRTP keys in place: media flows
    CLOSED = "closed"


class Transport:
    __slots__ = (
        "_addr",
        "_bwe_observed_at",
        "_feedback",
        "_packet_tap",
        "_sample",
        "_sendto",
        "_srtp",
        "bwe",
        "close_reason",
        "closed_by_client",
        "created_at",
        "dialer",
        "downtracks_by_ssrc",
        "dtls",
        "ice",
        "id",
        "mid_ext_id",
        "on_closed",
        "on_connected",
        "peer",
        "prober",
        "producers",
        "producers_by_mid",
        "producers_by_ssrc",
        "repaired_rid_ext_id",
        "retired_ssrcs",
        "rid_ext_id",
        "role",
        "rtcp_ssrc",
        "rtx_by_ssrc",
        "send_log",
        "state",
        "stats",
        "twcc",
        "twcc_ext_id",
    )

    def __init__(
        self,
        transport_id: str,
        role: str,
        ice: IceLiteSession,
        dtls: DtlsServer,
        sendto: Sendto,
        stats: MediaStats,
        peer: Any = None,
    ) -> None:
        # The native core's view of this transport (sfu.media._fastpath.Peer), kept in step
        # with the address, SRTP contexts and inbound SSRC routes below; None in Python mode.
        self.peer = peer
        if peer is not None:
            peer.owner = self
        self.id = transport_id
        self.role = role
        self.ice = ice
        self.dtls = dtls
        self._sendto = sendto
        self.stats = stats
        self.state = TransportState.NEW
        self.created_at = time.monotonic()
        self.close_reason: str | None = None
        # The client ended the association itself (DTLS close_notify): it is leaving.
        self.closed_by_client = False
        self._addr: Address | None = None
        self._srtp: SrtpSession | None = None
        self.rtcp_ssrc = secrets.randbits(32) or 1
        self._sample = FORWARD_SAMPLE_EVERY
        # Published tracks (a simulcast track is one entry; its layers route by SSRC).
        self.producers: list[Producer | SimulcastProducer] = []
        self.producers_by_ssrc: dict[int, Producer] = {}
        self.rtx_by_ssrc: dict[int, Producer] = {}
        # SSRCs a track moved away from (a publisher restart), oldest first: a late or
        # replayed packet of the old stream must not switch the track back to it.
        self.retired_ssrcs: dict[int, None] = {}
        self.producers_by_mid: dict[str, Producer | SimulcastProducer] = {}
        self.mid_ext_id: int | None = None
        # Simulcast: the RID and repaired-RID extension ids (RFC 8852), which name the layer
        # an undeclared SSRC (or its RTX stream) belongs to.
        self.rid_ext_id: int | None = None
        self.repaired_rid_ext_id: int | None = None
        # Transport-wide congestion control (publishers): 0 until negotiated.
        self.twcc_ext_id = 0
        self.twcc: TwccRecorder | None = None
        self.downtracks_by_ssrc: dict[int, DownTrack] = {}
        # Transport-cc toward a subscriber (enable_bwe): the counter and send log (the
        # native Peer, or a SendLog), the matcher and the estimate; None until negotiated.
        self.send_log: TransportSeqLog | None = None
        self._feedback: FeedbackMatcher | None = None
        self.bwe: BandwidthEstimator | None = None
        self.prober: Prober | None = None
        self._bwe_observed_at = -BWE_OBSERVE_INTERVAL
        # The dialing end of an SFU-to-SFU relay (sfu/media/relay.py); None for clients and
        # for a relay's answering end.
        self.dialer: RelayDialer | None = None
        self.on_connected: Callable[[Transport], None] | None = None
        self.on_closed: Callable[[Transport], None] | None = None
        # Test hook: sees every decrypted RTP packet this transport receives (None in service).
        self._packet_tap: Callable[[bytes], None] | None = None

    @property
    def ready(self) -> bool:
        return self._srtp is not None and self._addr is not None

    # -- state the native core mirrors -------------------------------------------------------

    @property
    def addr(self) -> Address | None:
        """Where this client's media goes (the nominated ICE address)."""
        return self._addr

    @addr.setter
    def addr(self, addr: Address | None) -> None:
        self._addr = addr
        if self.peer is not None:
            self.peer.set_address(addr)

    @property
    def srtp(self) -> SrtpSession | None:
        return self._srtp

    @srtp.setter
    def srtp(self, srtp: SrtpSession | None) -> None:
        self._srtp = srtp
        if self.peer is not None and srtp is not None:
            rx, tx = srtp.native_contexts()
            self.peer.set_srtp(rx, tx, srtp)

    @property
    def packet_tap(self) -> Callable[[bytes], None] | None:
        return self._packet_tap

    @packet_tap.setter
    def packet_tap(self, tap: Callable[[bytes], None] | None) -> None:
        self._packet_tap = tap
        if self.peer is not None:
            self.peer.python_only = tap is not None

    def routes_changed(self) -> None:
        """`producers_by_ssrc` changed: tell the native core which SSRC feeds which route."""
        if self.peer is not None:
            self.peer.set_routes({ssrc: p.route for ssrc, p in self.producers_by_ssrc.items()})

    # -- sending -----------------------------------------------------------------------------

    def send_rtp(self, packet: bytes | bytearray) -> None:
        srtp, addr = self._srtp, self._addr
        if srtp is None or addr is None:
            return
        log = self.send_log
        if log is not None and len(packet) <= MAX_PROTECT_SIZE:
            # The native core stamps what it sends itself the same way, on the same log.
            packet = self._stamp(packet, log)
        protected = srtp.protect_rtp(packet if type(packet) is bytes else bytes(packet))
        if protected is None:
            self.stats.srtp_failures += 1
            return
        self._sendto(protected, addr)
        self.stats.rtp_out += 1
        self.stats.rtp_bytes_out += len(protected)

    def _stamp(self, packet: bytes | bytearray, log: TransportSeqLog) -> bytes | bytearray:
        """This transport's next transport-wide number into the packet's transport-cc slot
        (header only). A packet not newer than its stream's last (a resend) keeps the number
        it went out with, as the native loop decides from the same record."""
        if type(packet) is bytes:
            if transport_seq_slot(packet, log.twcc_ext_id) < 0:
                return packet
            packet = bytearray(packet)
        assert isinstance(packet, bytearray)
        ssrc = int.from_bytes(packet[8:12])
        downtrack = self.downtracks_by_ssrc.get(ssrc)
        newer = True
        if downtrack is not None and downtrack.ssrc == ssrc:
            ahead = ((packet[2] << 8 | packet[3]) - downtrack.copy.last_seq) & 0xFFFF
            newer = 0 < ahead < 0x8000
        log.stamp(packet, time.monotonic(), newer)
        return packet

    def send_padding(self, budget: int) -> int:
        """About `budget` bytes of padding-only packets for a bandwidth probe, on the RTX
        stream of one of this subscriber's started video copies; returns the bytes sent (0:
        no copy has an RTX stream, or transport-cc is off)."""
        log = self.send_log
        if log is None or not self.ready:
            return 0
        carrier = next(
            (
                d
                for d in self.downtracks_by_ssrc.values()
                if d.kind == "video" and d.rtx_ssrc is not None and d.started and not d.closed
            ),
            None,
        )
        if carrier is None:
            return 0
        sent = 0
        while sent < budget:
            packet = carrier.padding_packet(min(budget - sent, PADDING_MAX), log.twcc_ext_id)
            if packet is None:
                break
            self.send_rtp(packet)
            sent += len(packet)
        return sent

    def enable_bwe(self, ext_id: int) -> None:
        """The subscriber negotiated transport-cc under `ext_id`: stamp our own transport-wide
        numbers on what it is sent, and estimate its bandwidth from its feedback."""
        log: TransportSeqLog = self.peer if self.peer is not None else SendLog()
        log.enable_twcc(ext_id)
        self.send_log = log
        if self.bwe is None:
            self.bwe = BandwidthEstimator()
            self._feedback = FeedbackMatcher()
            self.prober = Prober(self.stats.probes)

    def _on_transport_feedback(self, plain: bytes, packet: TransportCC) -> None:
        self.stats.twcc_feedback_received += 1
        bwe, matcher, log = self.bwe, self._feedback, self.send_log
        if bwe is None or matcher is None or log is None:
            return
        # The fixed FCI fields start 12 bytes into the RTCP packet.
        feedback = parse_transport_feedback(plain, packet.offset - 12)
        if feedback is None:
            self.stats.rtcp_malformed += 1
            return
        lost, received = matcher.lost, matcher.received
        results = matcher.match(feedback, log)
        reported = self.stats.twcc_reported
        reported[0] += matcher.received - received
        reported[1] += matcher.lost - lost
        if not results:
            return
        now = time.monotonic()
        estimate = bwe.on_feedback(results, now)
        if now - self._bwe_observed_at >= BWE_OBSERVE_INTERVAL:
            self._bwe_observed_at = now
            self.stats.bwe_estimates.observe(estimate)

    def send_rtcp(self, packet: bytes) -> None:
        srtp, addr = self._srtp, self._addr
        if srtp is None or addr is None:
            return
        protected = srtp.protect_rtcp(packet)
        if protected is None:
            self.stats.srtp_failures += 1
            return
        self._sendto(protected, addr)
        self.stats.rtcp_out += 1

    # Upstream protocol for producers published on this transport.
    def send_keyframe_request(self, producer: Producer) -> None:
        if producer.ssrc is not None:
            self.send_rtcp(build_pli(self.rtcp_ssrc, producer.ssrc))

    def send_nack(self, producer: Producer, seqs: list[int]) -> None:
        if producer.ssrc is not None:
            self.send_rtcp(build_nack(self.rtcp_ssrc, producer.ssrc, seqs))

    def enable_twcc(self, ext_id: int) -> None:
        """The publisher stamps transport-wide sequence numbers with `ext_id`: record their
        arrivals and send feedback (`send_transport_feedback`)."""
        self.twcc_ext_id = ext_id
        if self.twcc is None:
            self.twcc = TwccRecorder()

    def send_transport_feedback(self, now: float) -> None:
        """Report the arrivals recorded since the last call (the media timer, every 50 ms)."""
        twcc = self.twcc
        if twcc is None:
            return
        # The media SSRC field is not used by receivers of transport-wide feedback (it covers
        # the whole transport); libwebrtc fills in one of the streams, so do we.
        media_ssrc = next((p.ssrc for p in self.producers if p.ssrc is not None), 0)
        packets = twcc.build_feedback(self.rtcp_ssrc, media_ssrc, now)
        if packets is None:
            return
        for packet in packets:
            self.send_rtcp(packet)
        self.stats.twcc_feedback_sent += len(packets)

    def set_remote_fingerprints(self, fingerprints: list[Fingerprint]) -> None:
        """The client's DTLS fingerprint, when it arrives after the transport was made (the
        SFU offered first): a handshake that already finished is authenticated now."""
        for out in self.dtls.set_remote_fingerprints(fingerprints):
            if self.addr is not None:
                self._sendto(out, self.addr)
        self._after_dtls()

    # -- ICE ---------------------------------------------------------------------------------

    def on_ice_check(self, addr: Address) -> None:
        """An authenticated check came from `addr`: follow the client's nomination."""
        was_ready = self.ready
        selected = self.ice.selected
        if selected is not None:
            self.addr = selected
        elif self.addr is None:
            self.addr = addr
        if not was_ready and self.ready:
            self._became_ready()

    def on_relay_answer(self, data: bytes, addr: Address, now: float) -> None:
        """A STUN datagram from the peer this relay end dials: an answer to one of its checks
        renews consent, and the first one starts the DTLS handshake (as the client)."""
        dialer = self.dialer
        if dialer is None or self.state is TransportState.CLOSED:
            return
        first = not dialer.answered
        if not dialer.on_response(data, now):
            return
        self.ice.last_check = now
        if first:
            self.addr = addr
            self.state = TransportState.CONNECTING
            for out in self.dtls.start():
                self._sendto(out, addr)
            self._after_dtls()

    def dial(self, now: float) -> None:
        """The relay's next check, when due (the engine's timer calls this)."""
        dialer = self.dialer
        if dialer is not None and self.state is not TransportState.CLOSED and dialer.due(now):
            self._sendto(dialer.check(now), dialer.target)

    # -- DTLS --------------------------------------------------------------------------------

    def on_dtls(self, data: bytes, addr: Address) -> None:
        if self.state is TransportState.CLOSED:
            return
        if self.state is TransportState.NEW:
            self.state = TransportState.CONNECTING
        for out in self.dtls.feed(data):
            self._sendto(out, addr)
        self._after_dtls()

    def on_timer(self, now: float) -> None:
        if self.state is not TransportState.CONNECTING:
            return
        due = self.dtls.next_timeout()
        if due is not None and now >= due and self.addr is not None:
            for out in self.dtls.handle_timeout(now):
                self._sendto(out, self.addr)
            self._after_dtls()

    def _after_dtls(self) -> None:
        state = self.dtls.state
        if state is DtlsState.CONNECTED and self.srtp is None:
            keys = self.dtls.srtp_keys
            if keys is None:
                return
            self.srtp = SrtpSession(keys, "client" if self.dtls.client else "server")
            self.state = TransportState.CONNECTED
            if self.ready:
                self._became_ready()
            self.stats.dtls_ok += 1
            log.info("transport %s connected (%s)", self.id, keys.profile.name)
            if self.on_connected is not None:
                self.on_connected(self)
        elif state is DtlsState.FAILED:
            self.stats.dtls_failed += 1
            self.close(f"DTLS failed: {self.dtls.failure_reason}")
        elif state is DtlsState.CLOSED:
            self.closed_by_client = True
            self.close("client closed DTLS")

    def _became_ready(self) -> None:
        """Copies to this subscriber can start now: their producers look at each packet
        until they have (see Producer.refresh_attention)."""
        for producer in {p for d in self.downtracks_by_ssrc.values() for p in d.sources()}:
            producer.refresh_attention()

    # -- SRTP / SRTCP ------------------------------------------------------------------------

    def on_srtp(self, data: bytes) -> None:
        srtp = self.srtp
        if srtp is None:
            return
        self._sample -= 1
        if self._sample <= 0:
            # One packet in FORWARD_SAMPLE_EVERY is timed from here to its last send.
            self._sample = FORWARD_SAMPLE_EVERY
            started = time.perf_counter()
            self._on_srtp(data, srtp)
            self.stats.forward_latency.observe(time.perf_counter() - started)
            return
        self._on_srtp(data, srtp)

    def _on_srtp(self, data: bytes, srtp: SrtpSession) -> None:
        # RFC 5761 §4: RTCP packet types 192-223 occupy the second byte's range 64-95 after
        # masking the marker bit, which no dynamic RTP payload type uses.
        if len(data) > 1 and 64 <= data[1] & 0x7F <= 95:
            self._on_rtcp(data, srtp)
            return
        plain = srtp.unprotect_rtp(data)
        if plain is None:
            self.stats.srtp_failures += 1
            return
        self.on_plain_rtp(plain, len(data))

    def on_plain_rtp(
        self,
        plain: bytes,
        wire_len: int,
        now: float | None = None,
        forwarded_by: Producer | None = None,
        attention: Attention | None = None,
    ) -> None:
        """A decrypted RTP packet (`wire_len` bytes on the wire). The native core passes its
        batch's clock reading as `now`, and `forwarded_by` when it has already sent the
        packet to every ready copy of that producer (`attention`: copies it left to us)."""
        hdr = parse_header(plain)
        if hdr is None:
            self.stats.rtp_unroutable += 1
            return
        self.stats.rtp_in += 1
        self.stats.rtp_bytes_in += wire_len
        arrival: float | None = now
        twcc = self.twcc
        if twcc is not None:
            # Every packet counts, RTX and padding-only probes included: the publisher's
            # estimator probes bandwidth with them. One clock read serves the producer too.
            seq = read_transport_seq(plain, hdr, self.twcc_ext_id)
            if seq >= 0:
                if arrival is None:
                    arrival = time.monotonic()
                twcc.record(seq, arrival)
        if self._packet_tap is not None:
            self._packet_tap(plain)
        if forwarded_by is not None:
            self._count_in(forwarded_by.kind, len(plain))
            forwarded_by.on_rtp(plain, hdr, arrival, forwarded=True, attention=attention)
            return
        srtp = self._srtp
        if srtp is None:
            return
        producer = self.producers_by_ssrc.get(hdr.ssrc)
        if producer is None:
            producer = self.rtx_by_ssrc.get(hdr.ssrc)
            if producer is not None:
                self._count_in(producer.kind, len(plain))
                producer.on_rtx(plain, hdr, arrival)
                return
        else:
            self._count_in(producer.kind, len(plain))
            producer.on_rtp(plain, hdr, arrival)
            return
        if hdr.ssrc in self.retired_ssrcs:
            self.stats.rtp_unroutable += 1
            return
        srtp.note_inbound(hdr.ssrc)
        producer = self._bind_ssrc(plain, hdr)
        if producer is None:
            self.stats.rtp_unroutable += 1
            srtp.forget_inbound(hdr.ssrc)

    def _count_in(self, kind: str, size: int) -> None:
        counts = self.stats.by_kind[kind]
        counts[0] += 1
        counts[1] += size

    def _bind_ssrc(self, data: bytes, hdr: RtpHeader) -> Producer | None:
        """First packet of an SSRC the SDP did not declare: find its track by MID (RFC 8843)."""
        ssrc, payload_type = hdr.ssrc, hdr.payload_type
        track: Producer | SimulcastProducer | None = None
        if self.mid_ext_id is not None:
            mid = read_sdes_extension(data, hdr, self.mid_ext_id)
            if mid is not None:
                track = self.producers_by_mid.get(mid)
        if track is None and len(self.producers) == 1:
            track = self.producers[0]
        if track is None:
            return None
        producer = track.layer(self._rid(track, data, hdr) if track.rids else None)
        if producer is None:
            return None
        if payload_type == producer.codec.rtx_payload_type:
            if producer.rtx_ssrc is not None and producer.rtx_ssrc != ssrc:
                self._retire_ssrc(producer.rtx_ssrc)
            producer.rtx_ssrc = ssrc
            self.rtx_by_ssrc[ssrc] = producer
            self._count_in(producer.kind, len(data))
            producer.on_rtx(data, hdr)
        elif payload_type == producer.codec.payload_type:
            if producer.ssrc is not None and producer.ssrc != ssrc:
                self._retire_ssrc(producer.ssrc)
            self.producers_by_ssrc[ssrc] = producer
            self.routes_changed()
            self._count_in(producer.kind, len(data))
            producer.on_rtp(data, hdr)
        else:
            return None
        return producer

    def _rid(self, track: Producer | SimulcastProducer, data: bytes, hdr: RtpHeader) -> str | None:
        """The simulcast layer a new SSRC belongs to: named by its RID, or for an RTX stream
        by the repaired RID (RFC 8852 section 3.2)."""
        rid: str | None = None
        if hdr.payload_type == track.codec.rtx_payload_type and self.repaired_rid_ext_id:
            rid = read_sdes_extension(data, hdr, self.repaired_rid_ext_id)
        if rid is None and self.rid_ext_id is not None:
            rid = read_sdes_extension(data, hdr, self.rid_ext_id)
        return rid

    def _retire_ssrc(self, ssrc: int) -> None:
        """A track moved to a new SSRC: the old one routes nowhere and keeps no SRTP state."""
        self.producers_by_ssrc.pop(ssrc, None)
        self.rtx_by_ssrc.pop(ssrc, None)
        self.routes_changed()
        self.retired_ssrcs[ssrc] = None
        if len(self.retired_ssrcs) > MAX_RETIRED_SSRCS:
            del self.retired_ssrcs[next(iter(self.retired_ssrcs))]
        if self.srtp is not None:
            self.srtp.forget_inbound(ssrc)

    def _on_rtcp(self, data: bytes, srtp: SrtpSession) -> None:
        plain = srtp.unprotect_rtcp(data)
        if plain is None:
            self.stats.srtp_failures += 1
            return
        self.stats.rtcp_in += 1
        if len(plain) >= 8:
            # Each authentic sender SSRC gets a libsrtp context too; bounded there.
            srtp.note_inbound(int.from_bytes(plain[4:8]))
        packets, ok = parse_rtcp(plain)
        if not ok:
            self.stats.rtcp_malformed += 1
        for packet in packets:
            if isinstance(packet, Nack):
                self._on_nack(packet)
            elif isinstance(packet, Pli):
                self.stats.pli_received += 1
                downtrack = self.downtracks_by_ssrc.get(packet.media_ssrc)
                if downtrack is not None:
                    downtrack.on_keyframe_request()
            elif isinstance(packet, Fir):
                self.stats.fir_received += 1
                for entry in packet.entries:
                    downtrack = self.downtracks_by_ssrc.get(entry.ssrc)
                    if downtrack is not None:
                        downtrack.on_keyframe_request()
            elif isinstance(packet, SenderReport | ReceiverReport):
                # Consumed, never relayed raw: the SFU sends its own SRs per down-track, and
                # a publisher's SR describes a timeline the subscribers never see. Report
                # blocks about our copies give their round-trip time.
                for block in packet.reports:
                    downtrack = self.downtracks_by_ssrc.get(block.ssrc)
                    if downtrack is not None:
                        downtrack.on_report(block.fraction_lost, block.lsr, block.dlsr)
                        if self.bwe is not None:
                            self.bwe.rtt = downtrack.rtt
            elif isinstance(packet, TransportCC):
                self._on_transport_feedback(plain, packet)

    def _on_nack(self, nack: Nack) -> None:
        downtrack = self.downtracks_by_ssrc.get(nack.media_ssrc)
        self.stats.nacks_received += len(nack.seqs)
        if downtrack is None:
            return
        served_before = downtrack.nacks_served
        missing = downtrack.on_nack(nack.seqs)
        self.stats.nacks_served += downtrack.nacks_served - served_before
        if missing:
            self.stats.nacks_missed += len(missing)
            downtrack.producer.request_retransmission(missing)

    # -- periodic and teardown ---------------------------------------------------------------

    def send_sender_reports(self) -> None:
        for ssrc, downtrack in self.downtracks_by_ssrc.items():
            if ssrc != downtrack.ssrc:
                continue  # the RTX entry of the same down-track
            report = downtrack.sender_report()
            if report is not None:
                self.send_rtcp(report)

    def remove_producer(self, producer: Producer | SimulcastProducer) -> None:
        """Forget one track the publisher stopped (a re-offer without it) while the others
        go on: kept here, every stop and restart left a closed track and its packet ring in
        a transport that lives as long as the call."""
        self.producers = [p for p in self.producers if p is not producer]
        streams = set(getattr(producer, "layers", ())) | {producer}
        for table in (self.producers_by_ssrc, self.rtx_by_ssrc):
            for ssrc in [s for s, p in table.items() if p in streams]:
                del table[ssrc]
        self.routes_changed()
        if self.producers_by_mid.get(producer.mid) is producer:
            del self.producers_by_mid[producer.mid]

    def forget_downtrack(self, downtrack: DownTrack) -> None:
        for ssrc in [s for s, d in self.downtracks_by_ssrc.items() if d is downtrack]:
            del self.downtracks_by_ssrc[ssrc]
            # libsrtp keeps the copy's outbound context until the transport ends, on purpose:
            # were it dropped, a new copy drawing the same random SSRC would start a fresh
            # context and could repeat (SSRC, index), i.e. reuse a GCM nonce.

    def close(self, reason: str) -> None:
        """End the session and tell the client at once: RTCP BYE for every stream the SFU
        sends, then DTLS close_notify. Without them a standard WebRTC stack stays
        "connected" until its own timeouts and keeps sending into the void."""
        if self.state is TransportState.CLOSED:
            return
        downtracks = set(self.downtracks_by_ssrc.values())
        if self.ready:
            for downtrack in downtracks:
                if not downtrack.closed:
                    downtrack.bye()
            if self.producers:
                self.send_rtcp(build_bye([self.rtcp_ssrc]))
        self.state = TransportState.CLOSED
        self.close_reason = reason
        for producer in self.producers:
            producer.close()
        for downtrack in downtracks:
            downtrack.close()
        if self.addr is not None:
            for out in self.dtls.close():
                self._sendto(out, self.addr)
        self.ice.close()
        log.info("transport %s closed: %s", self.id, reason)
        # Producers point back here (their upstream) and the owner's callbacks close over
        # the session or participant that points here too: cut both, so an ended session is
        # freed by reference counting at once. Left to the cycle collector, each one kept
        # its OpenSSL connection and packet rings until a rare full collection.
        self.producers.clear()
        self.producers_by_ssrc.clear()
        if self.peer is not None:
            self.peer.close()
        self.rtx_by_ssrc.clear()
        self.producers_by_mid.clear()
        self.on_connected = None
        self._packet_tap = None
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed(self)
