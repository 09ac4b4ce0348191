// SFrame (RFC 9605) frame protection for the Blindfold browser client.
//
// This is the browser twin of sfu/client/sframe.py: the byte layout, key derivation, KID
// allocation and counter rules are specified in docs/e2ee.md, and both implementations must
// agree byte for byte (tests/js/sframe.test.mjs and tests/client/test_keyexchange.py check it).
//
// A protected frame is  clear_prefix || sframe_header || AES-GCM(frame[N:]) || tag , and the
// AEAD's additional data is  sframe_header || clear_prefix  (header first, as the RFC's
// "header + metadata"; the wire order is the other way round).
//
// Only WebCrypto is used (globalThis.crypto.subtle), so the module runs unchanged in a page,
// a worker and Node 20. WebCrypto is asynchronous, hence the async API. KIDs and counters are
// 64-bit, so they are BigInts here; functions that take one also accept a safe-integer Number.

/**
 * An RFC 9605 cipher suite (section 4.5). Only the AES-GCM suites are implemented.
 * @typedef {Object} CipherSuite
 * @property {number} id        suite identifier, e.g. 0x0004
 * @property {string} name
 * @property {'SHA-256'|'SHA-512'} hash
 * @property {number} nh        hash output length in bytes
 * @property {number} nk        AEAD key length in bytes
 * @property {number} nn        nonce length in bytes
 * @property {number} nt        tag length in bytes
 */

/** @type {Readonly<CipherSuite>} */
export const AES_128_GCM_SHA256_128 = Object.freeze({
  id: 0x0004, name: 'AES_128_GCM_SHA256_128', hash: 'SHA-256', nh: 32, nk: 16, nn: 12, nt: 16,
});
/** @type {Readonly<CipherSuite>} */
export const AES_256_GCM_SHA512_128 = Object.freeze({
  id: 0x0005, name: 'AES_256_GCM_SHA512_128', hash: 'SHA-512', nh: 64, nk: 32, nn: 12, nt: 16,
});
/** @type {ReadonlyMap<number, Readonly<CipherSuite>>} */
export const CIPHER_SUITES = new Map([
  [AES_128_GCM_SHA256_128.id, AES_128_GCM_SHA256_128],
  [AES_256_GCM_SHA512_128.id, AES_256_GCM_SHA512_128],
]);

export const MAX_UINT64 = (1n << 64n) - 1n;
export const MAX_KID = MAX_UINT64;
export const MAX_COUNTER = MAX_UINT64;

// Chrome's VP8 depacketizer reads the 3-byte frame tag, and on keyframes also the start code
// and dimensions (RFC 6386 section 9.1), so those bytes must stay readable.
export const VP8_KEYFRAME_CLEAR_PREFIX_LEN = 10;
export const VP8_DELTA_CLEAR_PREFIX_LEN = 3;
export const OPUS_CLEAR_PREFIX_LEN = 0;

// The low KID bits hold the key generation, so a rotation changes the KID and receivers can
// keep the previous key for frames in flight (docs/e2ee.md, "KID allocation").
export const KID_GENERATION_BITS = 4;

// Values 0-7 fit in the config byte; larger ones follow it in 1-8 bytes.
const INLINE_LIMIT = 8n;
const X_FLAG = 0x80;
const Y_FLAG = 0x08;

const textEncoder = new TextEncoder();
const KEY_LABEL = textEncoder.encode('SFrame 1.0 Secret key ');
const SALT_LABEL = textEncoder.encode('SFrame 1.0 Secret salt ');

// A base key shorter than this is far more likely a bug (a truncated or empty secret) than a
// deliberate choice; the Python client refuses the same keys.
const MIN_BASE_KEY_LEN = 16;

const subtle = globalThis.crypto.subtle;

/** A frame is not a well-formed SFrame envelope, or cannot be opened: drop it. */
export class SFrameError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = 'SFrameError';
  }
}

/** The header names a KID this receiver holds no key for. */
export class SFrameUnknownKidError extends SFrameError {
  /** @param {bigint} kid */
  constructor(kid) {
    super(`no key for KID 0x${kid.toString(16)}`);
    this.name = 'SFrameUnknownKidError';
    /** @type {bigint} */
    this.kid = kid;
  }
}

/** AEAD authentication failed: the frame was altered, or sealed under another key. */
export class SFrameAuthError extends SFrameError {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = 'SFrameAuthError';
  }
}

/**
 * Convert a KID/CTR-like value to a BigInt and check it is an unsigned 64-bit integer.
 * @param {string} name
 * @param {bigint|number} value
 * @returns {bigint}
 */
export function toUint64(name, value) {
  let big;
  if (typeof value === 'bigint') {
    big = value;
  } else if (typeof value === 'number' && Number.isSafeInteger(value)) {
    big = BigInt(value);
  } else {
    throw new RangeError(`${name} must be a BigInt or a safe integer, got ${String(value)}`);
  }
  if (big < 0n || big > MAX_UINT64) {
    throw new RangeError(`${name} must be an unsigned 64-bit integer, got ${big}`);
  }
  return big;
}

/**
 * The minimal big-endian bytes of a positive value (at least 1 byte).
 * @param {bigint} value
 * @returns {Uint8Array}
 */
function minimalBigEndian(value) {
  const out = [];
  let rest = value;
  do {
    out.unshift(Number(rest & 0xffn));
    rest >>= 8n;
  } while (rest > 0n);
  return Uint8Array.from(out);
}

/**
 * `value` as `length` big-endian bytes.
 * @param {bigint} value
 * @param {number} length
 * @returns {Uint8Array}
 */
export function uintToBytes(value, length) {
  const out = new Uint8Array(length);
  let rest = value;
  for (let i = length - 1; i >= 0; i--) {
    out[i] = Number(rest & 0xffn);
    rest >>= 8n;
  }
  return out;
}

/**
 * Concatenate byte arrays.
 * @param {...Uint8Array} parts
 * @returns {Uint8Array}
 */
export function concatBytes(...parts) {
  let length = 0;
  for (const part of parts) length += part.length;
  const out = new Uint8Array(length);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

/**
 * Encode an SFrame header (RFC 9605 section 4.3), always in its minimal form.
 * @param {bigint|number} kid
 * @param {bigint|number} ctr
 * @returns {Uint8Array}
 */
export function encodeHeader(kid, ctr) {
  const k = toUint64('kid', kid);
  const c = toUint64('ctr', ctr);
  let config = 0;
  /** @type {Uint8Array[]} */
  const tail = [];
  if (k < INLINE_LIMIT) {
    config |= Number(k) << 4;
  } else {
    const bytes = minimalBigEndian(k);
    config |= X_FLAG | ((bytes.length - 1) << 4);
    tail.push(bytes);
  }
  if (c < INLINE_LIMIT) {
    config |= Number(c);
  } else {
    const bytes = minimalBigEndian(c);
    config |= Y_FLAG | (bytes.length - 1);
    tail.push(bytes);
  }
  return concatBytes(Uint8Array.of(config), ...tail);
}

/**
 * @param {Uint8Array} data
 * @param {number} pos
 * @param {number} length
 * @param {string} what
 * @returns {[bigint, number]}
 */
function readExtended(data, pos, length, what) {
  const end = pos + length;
  if (end > data.length) throw new SFrameError(`SFrame header truncated in ${what}`);
  let value = 0n;
  for (let i = pos; i < end; i++) value = (value << 8n) | BigInt(data[i]);
  // The RFC requires the minimal encoding. Accepting others would give one (KID, CTR) several
  // header byte strings, and the header is part of the AAD, so the Python client refuses them.
  if (data[pos] === 0 || value < INLINE_LIMIT) {
    throw new SFrameError(`SFrame header ${what} is not minimally encoded`);
  }
  return [value, end];
}

/**
 * A decoded SFrame header and where it ends.
 * @typedef {Object} DecodedHeader
 * @property {bigint} kid
 * @property {bigint} ctr
 * @property {number} end   offset just past the header
 */

/**
 * Decode the SFrame header starting at `offset`. Throws SFrameError (never another error
 * type) on empty, truncated or non-minimal input.
 * @param {Uint8Array} data
 * @param {number} [offset]
 * @returns {DecodedHeader}
 */
export function decodeHeader(data, offset = 0) {
  if (offset < 0 || offset >= data.length) {
    throw new SFrameError('no SFrame header: frame ends before it');
  }
  const config = data[offset];
  let pos = offset + 1;
  let kid;
  let ctr;
  if (config & X_FLAG) {
    [kid, pos] = readExtended(data, pos, ((config >> 4) & 0x07) + 1, 'KID');
  } else {
    kid = BigInt((config >> 4) & 0x07);
  }
  if (config & Y_FLAG) {
    [ctr, pos] = readExtended(data, pos, (config & 0x07) + 1, 'CTR');
  } else {
    ctr = BigInt(config & 0x07);
  }
  return { kid, ctr, end: pos };
}

/**
 * Check the key-free shape of a protected frame and return its header; `end` is where the
 * ciphertext starts. This is all that can be learnt without a key (docs/e2ee.md section 8).
 * @param {Uint8Array} data
 * @param {number} clearPrefixLen
 * @param {Readonly<CipherSuite>} [suite]
 * @returns {DecodedHeader}
 */
export function parseEnvelope(data, clearPrefixLen, suite = AES_128_GCM_SHA256_128) {
  if (!Number.isInteger(clearPrefixLen) || clearPrefixLen < 0) {
    throw new RangeError('clearPrefixLen must be a non-negative integer');
  }
  if (data.length <= clearPrefixLen) {
    throw new SFrameError('frame too short for its clear prefix and an SFrame header');
  }
  const header = decodeHeader(data, clearPrefixLen);
  if (data.length - header.end < suite.nt) {
    throw new SFrameError('frame too short for the authentication tag');
  }
  return header;
}

/**
 * Build a KID from a participant's room slot and its key generation (docs/e2ee.md section 4).
 * @param {bigint|number} senderSlot
 * @param {bigint|number} generation
 * @returns {bigint}
 */
export function composeKid(senderSlot, generation) {
  const slot = toUint64('senderSlot', senderSlot);
  const gen = toUint64('generation', generation);
  const kid = (slot << BigInt(KID_GENERATION_BITS)) | (gen % (1n << BigInt(KID_GENERATION_BITS)));
  return toUint64('kid', kid);
}

/**
 * HMAC of `data` under `key` with the suite's hash.
 * @param {'SHA-256'|'SHA-512'} hash
 * @param {Uint8Array} key
 * @param {Uint8Array} data
 * @returns {Promise<Uint8Array>}
 */
async function hmac(hash, key, data) {
  const cryptoKey = await subtle.importKey('raw', key, { name: 'HMAC', hash }, false, ['sign']);
  return new Uint8Array(await subtle.sign('HMAC', cryptoKey, data));
}

/**
 * `sframe_secret = HKDF-Extract("", base_key)` (RFC 9605 section 4.4.2).
 * @param {Uint8Array} baseKey
 * @param {Readonly<CipherSuite>} [suite]
 * @returns {Promise<Uint8Array>}
 */
export async function deriveSecret(baseKey, suite = AES_128_GCM_SHA256_128) {
  // WebCrypto refuses an empty HMAC key. HMAC pads its key with zeros to the block size, so a
  // key of HashLen zero bytes gives the same result (this is RFC 5869's own default salt).
  return hmac(suite.hash, new Uint8Array(suite.nh), baseKey);
}

/**
 * HKDF-Expand (RFC 5869 section 2.3).
 * @param {'SHA-256'|'SHA-512'} hash
 * @param {number} hashLen
 * @param {Uint8Array} prk
 * @param {Uint8Array} info
 * @param {number} length
 * @returns {Promise<Uint8Array>}
 */
async function hkdfExpand(hash, hashLen, prk, info, length) {
  // WebCrypto's HKDF always runs Extract first, and SFrame needs the two steps apart (the
  // vectors pin sframe_secret), so Expand is written out; it is a few HMAC calls.
  const key = await subtle.importKey('raw', prk, { name: 'HMAC', hash }, false, ['sign']);
  const out = new Uint8Array(length);
  let previous = new Uint8Array(0);
  for (let i = 1, done = 0; done < length; i++) {
    const block = new Uint8Array(
      await subtle.sign('HMAC', key, concatBytes(previous, info, Uint8Array.of(i))),
    );
    out.set(block.subarray(0, Math.min(hashLen, length - done)), done);
    done += hashLen;
    previous = block;
  }
  return out;
}

/**
 * The key and salt HKDF-Expand labels: fixed text, 8-byte KID, 2-byte suite id.
 * @param {bigint|number} kid
 * @param {Readonly<CipherSuite>} [suite]
 * @returns {{keyLabel: Uint8Array, saltLabel: Uint8Array}}
 */
export function deriveLabels(kid, suite = AES_128_GCM_SHA256_128) {
  const suffix = concatBytes(uintToBytes(toUint64('kid', kid), 8), uintToBytes(BigInt(suite.id), 2));
  return { keyLabel: concatBytes(KEY_LABEL, suffix), saltLabel: concatBytes(SALT_LABEL, suffix) };
}

/**
 * Derive `sframe_key` and `sframe_salt` for one KID (RFC 9605 section 4.4.2).
 * @param {bigint|number} kid
 * @param {Uint8Array} baseKey
 * @param {Readonly<CipherSuite>} [suite]
 * @returns {Promise<{key: Uint8Array, salt: Uint8Array}>}
 */
export async function deriveKeySalt(kid, baseKey, suite = AES_128_GCM_SHA256_128) {
  const secret = await deriveSecret(baseKey, suite);
  const { keyLabel, saltLabel } = deriveLabels(kid, suite);
  const key = await hkdfExpand(suite.hash, suite.nh, secret, keyLabel, suite.nk);
  const salt = await hkdfExpand(suite.hash, suite.nh, secret, saltLabel, suite.nn);
  return { key, salt };
}

/** The derived AES-GCM key of one KID, ready to seal or open frames. */
export class SFrameKey {
  /**
   * Use {@link SFrameKey.create}: deriving the key is asynchronous.
   * @param {bigint} kid
   * @param {Readonly<CipherSuite>} suite
   * @param {CryptoKey} aesKey
   * @param {Uint8Array} salt
   */
  constructor(kid, suite, aesKey, salt) {
    /** @readonly */ this.kid = kid;
    /** @readonly */ this.suite = suite;
    /** @private */ this.aesKey = aesKey;
    /** @private */ this.salt = salt;
  }

  /**
   * @param {bigint|number} kid
   * @param {Uint8Array} baseKey
   * @param {Readonly<CipherSuite>} [suite]
   * @returns {Promise<SFrameKey>}
   */
  static async create(kid, baseKey, suite = AES_128_GCM_SHA256_128) {
    const k = toUint64('kid', kid);
    if (!CIPHER_SUITES.has(suite.id)) throw new RangeError(`cipher suite ${suite.name} is not implemented`);
    if (!(baseKey instanceof Uint8Array) || baseKey.length < MIN_BASE_KEY_LEN) {
      throw new RangeError(`baseKey must be at least ${MIN_BASE_KEY_LEN} bytes`);
    }
    const { key, salt } = await deriveKeySalt(k, baseKey, suite);
    // Not extractable: once derived, the AES key never needs to leave WebCrypto.
    const aesKey = await subtle.importKey('raw', key, 'AES-GCM', false, ['encrypt', 'decrypt']);
    return new SFrameKey(k, suite, aesKey, salt);
  }

  /**
   * `nonce = sframe_salt XOR CTR` (CTR big-endian in the low-order bytes).
   * @param {bigint} ctr
   * @returns {Uint8Array}
   */
  nonce(ctr) {
    const out = Uint8Array.from(this.salt);
    const ctrBytes = uintToBytes(ctr, 8);
    for (let i = 0; i < 8; i++) out[out.length - 8 + i] ^= ctrBytes[i];
    return out;
  }

  /**
   * Returns `header || ciphertext || tag`.
   * @param {bigint} ctr
   * @param {Uint8Array} metadata
   * @param {Uint8Array} plaintext
   * @returns {Promise<Uint8Array>}
   */
  async seal(ctr, metadata, plaintext) {
    const header = encodeHeader(this.kid, ctr);
    const sealed = await subtle.encrypt(
      { name: 'AES-GCM', iv: this.nonce(ctr), additionalData: concatBytes(header, metadata), tagLength: this.suite.nt * 8 },
      this.aesKey,
      plaintext,
    );
    return concatBytes(header, new Uint8Array(sealed));
  }

  /**
   * @param {bigint} ctr
   * @param {Uint8Array} header
   * @param {Uint8Array} metadata
   * @param {Uint8Array} ciphertext  ciphertext || tag
   * @returns {Promise<Uint8Array>}
   */
  async open(ctr, header, metadata, ciphertext) {
    try {
      const plain = await subtle.decrypt(
        { name: 'AES-GCM', iv: this.nonce(ctr), additionalData: concatBytes(header, metadata), tagLength: this.suite.nt * 8 },
        this.aesKey,
        ciphertext,
      );
      return new Uint8Array(plain);
    } catch {
      throw new SFrameAuthError(`authentication failed for KID 0x${this.kid.toString(16)}`);
    }
  }
}

/**
 * Protects one participant's outgoing frames under one KID and base key.
 *
 * Every track protected with this key (audio, video, each simulcast layer) must go through
 * this one object: its counter is what keeps nonces unique, and it hands out each CTR
 * synchronously, before any await, so concurrent transforms never get the same one.
 */
export class Sender {
  /**
   * Use {@link Sender.create}.
   * @param {SFrameKey} key
   * @param {bigint} counter
   */
  constructor(key, counter) {
    /** @private */ this.key = key;
    /** @private */ this.next = counter;
  }

  /**
   * @param {bigint|number} kid
   * @param {Uint8Array} baseKey
   * @param {{suite?: Readonly<CipherSuite>, counter?: bigint|number}} [options]
   *   `counter` is the next CTR to use; set it only to resume the same key's stream.
   * @returns {Promise<Sender>}
   */
  static async create(kid, baseKey, options = {}) {
    const counter = toUint64('counter', options.counter ?? 0n);
    return new Sender(await SFrameKey.create(kid, baseKey, options.suite), counter);
  }

  /** @returns {bigint} */
  get kid() { return this.key.kid; }

  /** @returns {Readonly<CipherSuite>} */
  get suite() { return this.key.suite; }

  /** The CTR the next frame will carry. @returns {bigint} */
  get counter() { return this.next; }

  /** @returns {bigint} */
  nextCounter() {
    const ctr = this.next;
    if (ctr > MAX_COUNTER) throw new RangeError('SFrame counter exhausted: rotate to a new key');
    // Advance before sealing so that no failure path can hand the same CTR out twice.
    this.next = ctr + 1n;
    return ctr;
  }

  /**
   * RFC 9605 `encrypt`: returns `header || ciphertext`; metadata is only authenticated.
   * @param {Uint8Array} metadata
   * @param {Uint8Array} plaintext
   * @returns {Promise<Uint8Array>}
   */
  encrypt(metadata, plaintext) {
    return this.key.seal(this.nextCounter(), metadata, plaintext);
  }

  /**
   * Protect one encoded frame, keeping its first `clearPrefixLen` bytes readable. Empty frames
   * come back empty: there is nothing to hide, and they use no counter value.
   * @param {Uint8Array} frame
   * @param {number} [clearPrefixLen]
   * @returns {Promise<Uint8Array>}
   */
  async protect(frame, clearPrefixLen = 0) {
    if (frame.length === 0) return new Uint8Array(0);
    if (!Number.isInteger(clearPrefixLen) || clearPrefixLen < 0 || clearPrefixLen > frame.length) {
      // Clamping would desynchronise a receiver that derives the length from the frame.
      throw new RangeError(`clearPrefixLen ${clearPrefixLen} does not fit a ${frame.length}-byte frame`);
    }
    const prefix = frame.subarray(0, clearPrefixLen);
    const sealed = await this.encrypt(prefix, frame.subarray(clearPrefixLen));
    return concatBytes(prefix, sealed);
  }
}

/**
 * Opens frames from any sender whose key it holds, looked up by the header's KID. A frame
 * that fails authentication throws SFrameAuthError and must be dropped, never decoded.
 */
export class Receiver {
  /** @param {Readonly<CipherSuite>} [suite] */
  constructor(suite = AES_128_GCM_SHA256_128) {
    /** @readonly */ this.suite = suite;
    /** @private @type {Map<bigint, SFrameKey>} */ this.keys = new Map();
    // Deriving a key is asynchronous; a removeKey (or a newer addKey) that lands while an
    // older addKey is still deriving must win, so each call takes a ticket.
    /** @private @type {Map<bigint, number>} */ this.tickets = new Map();
    /** @private */ this.nextTicket = 0;
  }

  /**
   * @param {bigint|number} kid
   * @param {Uint8Array} baseKey
   * @returns {Promise<void>}
   */
  async addKey(kid, baseKey) {
    const k = toUint64('kid', kid);
    const ticket = ++this.nextTicket;
    this.tickets.set(k, ticket);
    const key = await SFrameKey.create(k, baseKey, this.suite);
    if (this.tickets.get(k) === ticket) this.keys.set(k, key);
  }

  /** @param {bigint|number} kid */
  removeKey(kid) {
    const k = toUint64('kid', kid);
    this.tickets.set(k, ++this.nextTicket);
    this.keys.delete(k);
  }

  /**
   * @param {bigint|number} kid
   * @returns {boolean}
   */
  hasKey(kid) {
    return this.keys.has(toUint64('kid', kid));
  }

  /**
   * @private
   * @param {DecodedHeader} header
   * @param {Uint8Array} headerBytes
   * @param {Uint8Array} metadata
   * @param {Uint8Array} ciphertext
   * @returns {Promise<Uint8Array>}
   */
  openWith(header, headerBytes, metadata, ciphertext) {
    const key = this.keys.get(header.kid);
    if (key === undefined) return Promise.reject(new SFrameUnknownKidError(header.kid));
    return key.open(header.ctr, headerBytes, metadata, ciphertext);
  }

  /**
   * RFC 9605 `decrypt`: `sframeCiphertext` starts with the SFrame header.
   * @param {Uint8Array} metadata
   * @param {Uint8Array} sframeCiphertext
   * @returns {Promise<Uint8Array>}
   */
  async decrypt(metadata, sframeCiphertext) {
    const header = parseEnvelope(sframeCiphertext, 0, this.suite);
    return this.openWith(
      header, sframeCiphertext.subarray(0, header.end), metadata, sframeCiphertext.subarray(header.end),
    );
  }

  /**
   * Reverse {@link Sender.protect}: returns the original encoded frame. Throws SFrameError for
   * a malformed envelope, SFrameUnknownKidError for a KID without a key and SFrameAuthError
   * when authentication fails.
   * @param {Uint8Array} data
   * @param {number} [clearPrefixLen]
   * @returns {Promise<Uint8Array>}
   */
  async unprotect(data, clearPrefixLen = 0) {
    if (data.length === 0) return new Uint8Array(0);
    const header = parseEnvelope(data, clearPrefixLen, this.suite);
    const prefix = data.subarray(0, clearPrefixLen);
    const plaintext = await this.openWith(
      header, data.subarray(clearPrefixLen, header.end), prefix, data.subarray(header.end),
    );
    return concatBytes(prefix, plaintext);
  }
}

/**
 * Clear bytes of a VP8 frame: 10 on keyframes, 3 on delta frames, 0 if empty. Works on both
 * the encoded frame and its protected form, since the byte it reads (the inverted keyframe
 * bit P, RFC 6386 section 9.1) is itself inside the clear prefix.
 * @param {Uint8Array} frame
 * @returns {number}
 */
export function vp8ClearPrefixLen(frame) {
  if (frame.length === 0) return 0;
  return frame[0] & 0x01 ? VP8_DELTA_CLEAR_PREFIX_LEN : VP8_KEYFRAME_CLEAR_PREFIX_LEN;
}

/**
 * The clear prefix length for `codec`: an SDP codec name ("VP8", "opus") or a MIME type
 * ("video/VP8", "audio/opus"). Throws for codecs without a rule (docs/e2ee.md section 3).
 * @param {string} codec
 * @param {Uint8Array} frame
 * @returns {number}
 */
export function clearPrefixLenFor(codec, frame) {
  const name = codec.toLowerCase().replace(/^(video|audio)\//, '');
  if (name === 'vp8') return vp8ClearPrefixLen(frame);
  if (name === 'opus') return OPUS_CLEAR_PREFIX_LEN;
  throw new RangeError(`no E2EE clear-prefix rule for codec ${JSON.stringify(codec)} (see docs/e2ee.md)`);
}
