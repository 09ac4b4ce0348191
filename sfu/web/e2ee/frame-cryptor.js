// The per-frame logic of the browser's E2EE transform, kept free of any WebRTC API so that
// Node tests can run it (tests/js/frame-cryptor.test.mjs). worker.js feeds it the bytes of
// RTCEncodedVideoFrame / RTCEncodedAudioFrame objects and writes back what it returns.
//
// The rules are docs/e2ee.md's: VP8 keeps 10 clear bytes on keyframes and 3 on delta frames,
// decided by the keyframe bit of byte 0 (which the receiver sees too, since it is in the clear
// prefix), Opus keeps none; zero-length frames pass through; a frame that cannot be protected
// is dropped rather than sent in the clear; a frame that does not authenticate is dropped
// rather than handed to the decoder.

import {
  AES_128_GCM_SHA256_128,
  OPUS_CLEAR_PREFIX_LEN,
  Receiver,
  SFrameAuthError,
  SFrameError,
  SFrameUnknownKidError,
  Sender,
  parseEnvelope,
  toUint64,
  vp8ClearPrefixLen,
} from './sframe.js';

/**
 * What happened to one frame.
 * - `ok`: protected or opened; forward `data`.
 * - `empty`: zero-length; forwarded unchanged.
 * - `no-key`: (send) no send key yet; dropped.
 * - `unknown-kid`: (receive) no key for the frame's KID; dropped.
 * - `auth-failed`: (receive) the AEAD tag did not verify; dropped.
 * - `malformed`: not a well-formed envelope, or (send) shorter than its clear prefix; dropped.
 * - `unsupported`: a codec without a clear-prefix rule; dropped.
 * @typedef {'ok'|'empty'|'no-key'|'unknown-kid'|'auth-failed'|'malformed'|'unsupported'} FrameStatus
 */

/**
 * @typedef {Object} FrameResult
 * @property {FrameStatus} status
 * @property {Uint8Array} [data]  present exactly when the frame should be forwarded
 * @property {bigint} [kid]       the frame's KID when known
 */

/** @typedef {'audio'|'video'} MediaKind */

/** Counters of one transform (one track, one direction). */
export class FrameStats {
  constructor() {
    this.ok = 0;
    this.empty = 0;
    this.noKey = 0;
    this.unknownKid = 0;
    this.authFailed = 0;
    this.malformed = 0;
    this.unsupported = 0;
    /** KID of the last frame that carried one, as a hex string (JSON-friendly). @type {string|null} */
    this.lastKid = null;
  }

  /** @param {FrameResult} result */
  record(result) {
    switch (result.status) {
      case 'ok': this.ok++; break;
      case 'empty': this.empty++; break;
      case 'no-key': this.noKey++; break;
      case 'unknown-kid': this.unknownKid++; break;
      case 'auth-failed': this.authFailed++; break;
      case 'malformed': this.malformed++; break;
      default: this.unsupported++;
    }
    if (result.kid !== undefined) this.lastKid = `0x${result.kid.toString(16)}`;
  }

  /** Frames dropped for any reason. */
  get dropped() {
    return this.noKey + this.unknownKid + this.authFailed + this.malformed + this.unsupported;
  }

  toJSON() {
    return {
      ok: this.ok, empty: this.empty, noKey: this.noKey, unknownKid: this.unknownKid,
      authFailed: this.authFailed, malformed: this.malformed, unsupported: this.unsupported,
      dropped: this.dropped, lastKid: this.lastKid,
    };
  }
}

/**
 * The clear-prefix length for a frame of `kind`, or null when the codec has no rule.
 * @param {MediaKind} kind
 * @param {string|undefined} mimeType  e.g. "video/VP8" from getMetadata(), when the browser
 *   gives it; E2EE rooms negotiate only VP8 and Opus, so without it the kind decides
 * @param {Uint8Array} data  the frame as this side sees it (plain on send, protected on receive)
 * @returns {number|null}
 */
export function clearPrefixLen(kind, mimeType, data) {
  const codec = mimeType?.toLowerCase();
  if (kind === 'video') {
    if (codec !== undefined && codec !== 'video/vp8') return null;
    // Byte 0's keyframe bit, not RTCEncodedVideoFrame.type: the receiver has only the bytes,
    // and this bit is inside the clear prefix, so both sides compute the same length.
    return vp8ClearPrefixLen(data);
  }
  if (codec !== undefined && codec !== 'audio/opus') return null;
  return OPUS_CLEAR_PREFIX_LEN;
}

/**
 * One participant's frame encryption state: the send key (one SFrame counter shared by every
 * outgoing track) and the receive keys of every peer, by KID.
 */
export class FrameCryptor {
  /**
   * @param {{unknownKidWaitMs?: number}} [options]  how long the first frame with an unknown
   *   KID may wait for its key (RFC 9605 section 4.4.4 allows holding it); later frames with the
   *   same KID are dropped at once until the key arrives, so a stream stalls at most once
   */
  constructor(options = {}) {
    /** @private */ this.suite = AES_128_GCM_SHA256_128;
    /** @private @type {Sender|null} */ this.sender = null;
    /** @private @type {Promise<Sender|null>} */ this.senderReady = Promise.resolve(null);
    /** @private @type {{kid: bigint, key: string}|null} */ this.sendIdentity = null;
    /** @private */ this.receiver = new Receiver(this.suite);
    /** @private */ this.unknownKidWaitMs = options.unknownKidWaitMs ?? 1000;
    /** @private @type {Map<bigint, Array<() => void>>} */ this.waiters = new Map();
    /** @private @type {Set<bigint>} */ this.gaveUp = new Set();
  }

  /**
   * Protect outgoing frames with this key from now on.
   * @param {bigint|number} kid
   * @param {Uint8Array} key
   * @returns {Promise<void>}
   */
  setSendKey(kid, key) {
    const k = toUint64('kid', kid);
    const identity = { kid: k, key: Array.from(key).join(',') };
    // Setting the same key again must not restart its counter: that would repeat nonces.
    if (this.sendIdentity !== null && this.sendIdentity.kid === k && this.sendIdentity.key === identity.key) {
      return this.senderReady.then(() => {});
    }
    this.sendIdentity = identity;
    const ready = Sender.create(k, Uint8Array.from(key), { suite: this.suite }).then((sender) => {
      // A newer setSendKey may have started while this one was deriving.
      if (this.sendIdentity === identity) this.sender = sender;
      return sender;
    });
    this.senderReady = ready;
    return ready.then(() => {});
  }

  /**
   * @param {bigint|number} kid
   * @param {Uint8Array} key
   * @returns {Promise<void>}
   */
  async addReceiveKey(kid, key) {
    const k = toUint64('kid', kid);
    await this.receiver.addKey(k, Uint8Array.from(key));
    this.gaveUp.delete(k);
    const waiting = this.waiters.get(k) ?? [];
    this.waiters.delete(k);
    for (const wake of waiting) wake();
  }

  /** @param {bigint|number} kid */
  removeReceiveKey(kid) {
    this.receiver.removeKey(toUint64('kid', kid));
  }

  /**
   * Protect one outgoing frame.
   * @param {Uint8Array} data
   * @param {MediaKind} kind
   * @param {string} [mimeType]
   * @returns {Promise<FrameResult>}
   */
  async encryptFrame(data, kind, mimeType) {
    if (data.length === 0) return { status: 'empty', data };
    const prefixLen = clearPrefixLen(kind, mimeType, data);
    if (prefixLen === null) return { status: 'unsupported' };
    // Take the sender synchronously: the counter is allocated before the first await inside
    // protect(), so frames from concurrent transforms never share a CTR.
    const sender = this.sender ?? (await this.senderReady);
    if (sender === null) return { status: 'no-key' };
    if (data.length < prefixLen) return { status: 'malformed' };
    return { status: 'ok', data: await sender.protect(data, prefixLen), kid: sender.kid };
  }

  /**
   * Open one incoming frame.
   * @param {Uint8Array} data
   * @param {MediaKind} kind
   * @param {string} [mimeType]
   * @returns {Promise<FrameResult>}
   */
  async decryptFrame(data, kind, mimeType) {
    if (data.length === 0) return { status: 'empty', data };
    const prefixLen = clearPrefixLen(kind, mimeType, data);
    if (prefixLen === null) return { status: 'unsupported' };
    let kid;
    try {
      // Read the KID first so every outcome can say whose frame it was (the page maps KIDs
      // to peers for its "cannot decrypt" labels).
      kid = parseEnvelope(data, prefixLen, this.suite).kid;
    } catch (err) {
      return this.failure(err);
    }
    if (!this.receiver.hasKey(kid) && this.unknownKidWaitMs > 0 && !this.gaveUp.has(kid)) {
      if (!(await this.waitForKey(kid))) {
        // Bound the set: a hostile SFU can send any number of made-up KIDs.
        if (this.gaveUp.size >= 1024) this.gaveUp.clear();
        this.gaveUp.add(kid);
      }
    }
    try {
      return { status: 'ok', data: await this.receiver.unprotect(data, prefixLen), kid };
    } catch (err) {
      return { ...this.failure(err), kid };
    }
  }

  /**
   * @private
   * @param {unknown} err
   * @returns {FrameResult}
   */
  failure(err) {
    if (err instanceof SFrameUnknownKidError) return { status: 'unknown-kid', kid: err.kid };
    if (err instanceof SFrameAuthError) return { status: 'auth-failed' };
    if (err instanceof SFrameError) return { status: 'malformed' };
    throw err;
  }

  /**
   * Resolves true when a key for `kid` arrives within the wait, false otherwise.
   * @private
   * @param {bigint} kid
   * @returns {Promise<boolean>}
   */
  waitForKey(kid) {
    return new Promise((resolve) => {
      const list = this.waiters.get(kid) ?? [];
      const timer = setTimeout(() => {
        const current = this.waiters.get(kid);
        if (current !== undefined) {
          const rest = current.filter((w) => w !== wake);
          if (rest.length === 0) this.waiters.delete(kid);
          else this.waiters.set(kid, rest);
        }
        resolve(false);
      }, this.unknownKidWaitMs);
      const wake = () => {
        clearTimeout(timer);
        resolve(true);
      };
      list.push(wake);
      this.waiters.set(kid, list);
    });
  }
}
