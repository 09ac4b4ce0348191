// The browser's E2EE frame-transform worker. Load it as a module worker:
//
//   const worker = new Worker(new URL('./e2ee/worker.js', import.meta.url), { type: 'module' });
//
// Use ONE worker for every sender and receiver of the page: every outgoing track must share the
// one SFrame counter of the send key (docs/e2ee.md section 5), and the worker holds it.
//
// Attaching transforms:
// - RTCRtpScriptTransform (preferred):
//     sender.transform = new RTCRtpScriptTransform(worker, { operation: 'encrypt', kind: 'video' });
//     receiver.transform = new RTCRtpScriptTransform(worker,
//       { operation: 'decrypt', kind: receiver.track.kind, peerId, trackId: receiver.track.id });
// - createEncodedStreams() fallback (needs `encodedInsertableStreams: true` on the
//   RTCPeerConnection): post the streams, transferring them:
//     const { readable, writable } = sender.createEncodedStreams();
//     worker.postMessage({ type: 'stream', readable, writable, options: { operation: 'encrypt', kind } },
//       [readable, writable]);
//
// Messages the page posts (KIDs are BigInts or safe integers, keys Uint8Array/ArrayBuffer):
//   { type: 'setSendKey', kid, key }     from KeyExchange's onSendKey
//   { type: 'addReceiveKey', kid, key }  from KeyExchange's onKey
//   { type: 'removeReceiveKey', kid }    from KeyExchange's onKeyRemoved
//   { type: 'statsInterval', ms }        how often stats are posted (default 1000; 0 = never)
//   { type: 'relabel', label, peerId, trackId }
//                                        a receiver whose options carried `label` now carries
//                                        another sender's track (the SFU recycled its section):
//                                        new labels, counters from zero
// Messages the worker posts:
//   { type: 'stats', streams: [{ id, operation, kind, peerId, trackId, ended, ok, empty, noKey,
//       unknownKid, authFailed, malformed, unsupported, dropped, lastKid }],
//     totals: { encrypt: {...}, decrypt: {...} } }
//     A receive stream whose unknownKid/authFailed grow while ok does not is one the page
//     should label "cannot decrypt" (its sender's key has not reached us, or is not the room's).
//   { type: 'error', message }

import { FrameCryptor, FrameStats } from './frame-cryptor.js';

const cryptor = new FrameCryptor();

/**
 * @typedef {Object} TransformOptions
 * @property {'encrypt'|'decrypt'} operation
 * @property {'audio'|'video'} [kind]  when absent, taken from the frame (video frames have `type`)
 * @property {string} [peerId]   for receive streams: whose media this is (for the page's labels)
 * @property {string} [trackId]
 * @property {number} [label]    the page's id for the receiver, for `relabel`
 */

/**
 * @typedef {Object} StreamEntry
 * @property {number} id
 * @property {TransformOptions} options
 * @property {FrameStats} stats
 * @property {boolean} ended
 */

/** @type {Map<number, StreamEntry>} */
const streams = new Map();
let nextStreamId = 1;
/** @type {ReturnType<typeof setInterval>|null} */
let statsTimer = null;

/** @param {unknown} err */
function reportError(err) {
  self.postMessage({ type: 'error', message: err instanceof Error ? err.message : String(err) });
}

/**
 * @param {unknown} frame  an RTCEncodedVideoFrame or RTCEncodedAudioFrame
 * @param {TransformOptions} options
 * @returns {'audio'|'video'}
 */
function kindOf(frame, options) {
  if (options.kind === 'audio' || options.kind === 'video') return options.kind;
  // RTCEncodedVideoFrame has `type` ('key' | 'delta' | 'empty'); RTCEncodedAudioFrame does not.
  return typeof (/** @type {{type?: unknown}} */ (frame).type) === 'string' ? 'video' : 'audio';
}

/**
 * @param {any} frame
 * @returns {string|undefined}
 */
function mimeTypeOf(frame) {
  try {
    const meta = typeof frame.getMetadata === 'function' ? frame.getMetadata() : undefined;
    return typeof meta?.mimeType === 'string' ? meta.mimeType : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Wire one encoded-frame stream through the cryptor. Frames that come back without data are
 * never enqueued: a frame that cannot be protected is not sent, and one that does not
 * authenticate never reaches the decoder.
 * @param {ReadableStream} readable
 * @param {WritableStream} writable
 * @param {TransformOptions} options
 */
function attach(readable, writable, options) {
  if (options?.operation !== 'encrypt' && options?.operation !== 'decrypt') {
    reportError(new Error(`transform options need operation 'encrypt' or 'decrypt', got ${JSON.stringify(options)}`));
    return;
  }
  /** @type {StreamEntry} */
  const entry = { id: nextStreamId++, options, stats: new FrameStats(), ended: false };
  streams.set(entry.id, entry);
  const encrypt = options.operation === 'encrypt';
  const transform = new TransformStream({
    async transform(frame, controller) {
      const data = new Uint8Array(frame.data);
      const kind = kindOf(frame, options);
      const mimeType = mimeTypeOf(frame);
      const result = encrypt
        ? await cryptor.encryptFrame(data, kind, mimeType)
        : await cryptor.decryptFrame(data, kind, mimeType);
      entry.stats.record(result);
      if (result.data === undefined) return;
      if (result.status !== 'empty') {
        // frame.data must be an ArrayBuffer holding exactly the frame.
        const out = result.data;
        frame.data = out.byteOffset === 0 && out.byteLength === out.buffer.byteLength
          ? out.buffer
          : out.slice().buffer;
      }
      controller.enqueue(frame);
    },
  });
  readable
    .pipeThrough(transform)
    .pipeTo(writable)
    .catch(reportError)
    .finally(() => {
      entry.ended = true;
      postStats();
      streams.delete(entry.id);
    });
}

function postStats() {
  const totals = { encrypt: new FrameStats(), decrypt: new FrameStats() };
  const list = [];
  for (const entry of streams.values()) {
    const total = totals[entry.options.operation];
    for (const name of /** @type {const} */ (['ok', 'empty', 'noKey', 'unknownKid', 'authFailed', 'malformed', 'unsupported'])) {
      total[name] += entry.stats[name];
    }
    list.push({
      id: entry.id,
      operation: entry.options.operation,
      kind: entry.options.kind ?? null,
      peerId: entry.options.peerId ?? null,
      trackId: entry.options.trackId ?? null,
      ended: entry.ended,
      ...entry.stats.toJSON(),
    });
  }
  // lastKid is per stream; a sum over streams has none.
  const sum = (/** @type {FrameStats} */ stats) => {
    const { lastKid: _, ...counts } = stats.toJSON();
    return counts;
  };
  self.postMessage({ type: 'stats', streams: list, totals: { encrypt: sum(totals.encrypt), decrypt: sum(totals.decrypt) } });
}

/**
 * @param {number} label
 * @param {string|null} peerId
 * @param {string|null} trackId
 */
function relabel(label, peerId, trackId) {
  for (const entry of streams.values()) {
    if (entry.options.label !== label) continue;
    // A different sender: its frames must not be judged by the previous sender's counts.
    entry.options = { ...entry.options, peerId: peerId ?? undefined, trackId: trackId ?? undefined };
    entry.stats = new FrameStats();
  }
}

/** @param {number} ms */
function setStatsInterval(ms) {
  if (statsTimer !== null) clearInterval(statsTimer);
  statsTimer = ms > 0 ? setInterval(postStats, ms) : null;
}

/**
 * @param {ArrayBuffer|ArrayBufferView} key
 * @returns {Uint8Array}
 */
function keyBytes(key) {
  if (key instanceof ArrayBuffer) return new Uint8Array(key);
  return new Uint8Array(key.buffer, key.byteOffset, key.byteLength);
}

self.onmessage = (event) => {
  const msg = event.data;
  try {
    switch (msg?.type) {
      case 'setSendKey':
        cryptor.setSendKey(msg.kid, keyBytes(msg.key)).catch(reportError);
        break;
      case 'addReceiveKey':
        cryptor.addReceiveKey(msg.kid, keyBytes(msg.key)).catch(reportError);
        break;
      case 'removeReceiveKey':
        cryptor.removeReceiveKey(msg.kid);
        break;
      case 'stream':
        attach(msg.readable, msg.writable, msg.options);
        break;
      case 'statsInterval':
        setStatsInterval(Number(msg.ms));
        break;
      case 'relabel':
        relabel(msg.label, msg.peerId ?? null, msg.trackId ?? null);
        break;
      default:
        reportError(new Error(`unknown message type ${JSON.stringify(msg?.type)}`));
    }
  } catch (err) {
    reportError(err);
  }
};

// RTCRtpScriptTransform: one event per sender or receiver the page attached to this worker.
// (Setting the handler where the API is missing is harmless: nothing fires it.)
/** @param {any} event */
self.onrtctransform = (event) => {
  const transformer = event.transformer;
  attach(transformer.readable, transformer.writable, transformer.options);
};

setStatsInterval(1000);
