// Passphrase-authenticated exchange of SFrame media keys over the SFU's blind relay.
//
// The browser twin of sfu/client/keyexchange.py: the same protocol, specified in
// docs/e2ee.md ("Key exchange"), and tested against the Python implementation
// (tests/client/test_keyexchange.py drives tests/js/kx_driver.mjs) and against pinned vectors
// (tests/client/keyexchange_vectors.json).
//
// In short: room_secret = PBKDF2-SHA256(passphrase, room) gives a MAC key and a pairwise salt;
// each participant announces an ephemeral ECDH P-256 public key in a MACed "hello"; each pair
// derives an AES-256-GCM key from ECDH + HKDF (salted by the passphrase, bound to both ids and
// public keys); each sender's media key travels to each peer sealed under that pairwise key,
// with a generation number that only ever goes up, so a replay cannot roll a receiver back.
//
// Only WebCrypto is used. WebCrypto is asynchronous, so every public method queues its work on
// one promise chain: messages are handled one at a time, in the order they arrived, exactly
// like the synchronous Python state machine.

import { KID_GENERATION_BITS, composeKid, concatBytes, uintToBytes } from './sframe.js';

export const PROTOCOL_VERSION = 1;

// PBKDF2-HMAC-SHA256 cost; part of the protocol (every participant must use the same number).
// 300 000 iterations took about 105-170 ms in headless Chromium and 140 ms in Node 20 on a
// 2-core EPYC; 600 000 took up to 280 ms, too close to a 300 ms budget on slower devices.
export const PBKDF2_ITERATIONS = 300000;

// The relay refuses payloads above 4 KiB; ours are about 250 characters.
export const MAX_PAYLOAD_CHARS = 4096;
export const MEDIA_KEY_LEN = 16;

/** Reasons given to onPeerRejected; see the Python module for what each one means. */
export const REJECT = Object.freeze({
  /** A hello's MAC failed: another passphrase, or the message or its sender id was altered. */
  UNVERIFIED: 'unverified',
  /** A key message did not decrypt under the pairwise key: altered, misattributed or stale. */
  KEY_UNAUTHENTICATED: 'key-unauthenticated',
  /** Not a well-formed message of this protocol. */
  MALFORMED: 'malformed',
  /** A message of another protocol version. */
  UNSUPPORTED_VERSION: 'unsupported-version',
  /** A KID another peer already uses. */
  KID_CONFLICT: 'kid-conflict',
  /** A KID whose generation bits or slot do not match. */
  BAD_KID: 'bad-kid',
});

const PUBLIC_KEY_LEN = 65; // uncompressed P-256 point: 0x04 || X || Y
const MAC_LEN = 32;
const IV_LEN = 12;
const TAG_LEN = 16;

const MAX_EARLY_MESSAGES = 256;
const MAX_PENDING_PER_PEER = 8;
const MAX_PENDING_PEERS = 64;
const MAX_TOMBSTONES = 1024;

const KID_RE = /^0x[0-9a-f]{1,16}$/;
const B64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder('utf-8', { fatal: true });
const subtle = globalThis.crypto.subtle;

const LABEL = 'blindfold-kx-v1/';
const PBKDF2_LABEL = encoder.encode(`${LABEL}pbkdf2`);
const MAC_KEY_LABEL = encoder.encode(`${LABEL}mac-key`);
const PAIR_SALT_LABEL = encoder.encode(`${LABEL}pair-salt`);
const HELLO_LABEL = encoder.encode(`${LABEL}hello`);
const PAIRWISE_LABEL = encoder.encode(`${LABEL}pairwise`);
const KEY_LABEL = encoder.encode(`${LABEL}key`);

// RFC 5869: an absent salt is HashLen zero bytes. Passing them explicitly matches Python's
// HKDF(salt=None) without relying on how a browser treats an empty salt.
const ZERO_SALT = new Uint8Array(32);

class Malformed extends Error {}

// --- Primitives (pinned by tests/client/keyexchange_vectors.json in both languages) ---------

/** @param {string} text @returns {Uint8Array} */
const utf8 = (text) => encoder.encode(text);

/**
 * People type passphrases on different keyboards; NFC makes every way of typing "é" derive the
 * same key. Room names get the same treatment so both sides salt alike.
 * @param {string} text
 * @returns {Uint8Array}
 */
const nfc = (text) => encoder.encode(text.normalize('NFC'));

/**
 * Each field as a 4-byte big-endian length and its bytes: an unambiguous concatenation.
 * @param {...Uint8Array} fields
 * @returns {Uint8Array}
 */
export function lengthPrefixed(...fields) {
  const parts = [];
  for (const f of fields) parts.push(uintToBytes(BigInt(f.length), 4), f);
  return concatBytes(...parts);
}

/** @param {number|bigint} value @returns {Uint8Array} */
const u64 = (value) => uintToBytes(BigInt(value), 8);

/** @param {Uint8Array} bytes @returns {string} */
export function toBase64(bytes) {
  let binary = '';
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary);
}

/** @param {string} text @returns {Uint8Array} */
export function fromBase64(text) {
  if (typeof text !== 'string' || !B64_RE.test(text)) throw new Malformed('not base64');
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

/**
 * `PBKDF2-HMAC-SHA256(NFC(passphrase), salt = LP(label, NFC(room)), iterations, 32 bytes)`.
 * @param {string} room
 * @param {string} passphrase
 * @param {number} [iterations]
 * @returns {Promise<Uint8Array>}
 */
export async function deriveRoomSecret(room, passphrase, iterations = PBKDF2_ITERATIONS) {
  if (!passphrase) throw new RangeError('the room passphrase must not be empty');
  if (!Number.isSafeInteger(iterations) || iterations < 1) throw new RangeError('iterations must be positive');
  const base = await subtle.importKey('raw', nfc(passphrase), 'PBKDF2', false, ['deriveBits']);
  const salt = lengthPrefixed(PBKDF2_LABEL, nfc(room));
  return new Uint8Array(await subtle.deriveBits({ name: 'PBKDF2', hash: 'SHA-256', salt, iterations }, base, 256));
}

/**
 * HKDF-SHA256 with 32 bytes of output.
 * @param {Uint8Array} ikm
 * @param {Uint8Array} salt
 * @param {Uint8Array} info
 * @returns {Promise<Uint8Array>}
 */
async function hkdf(ikm, salt, info) {
  const key = await subtle.importKey('raw', ikm, 'HKDF', false, ['deriveBits']);
  return new Uint8Array(await subtle.deriveBits({ name: 'HKDF', hash: 'SHA-256', salt, info }, key, 256));
}

/**
 * The two keys every participant with the passphrase derives; never sent anywhere.
 * @typedef {Object} RoomKeys
 * @property {Uint8Array} macKey    authenticates hellos (HMAC-SHA256)
 * @property {Uint8Array} pairSalt  HKDF salt of every pairwise key
 */

/**
 * Split the room secret into the hello MAC key and the pairwise-key salt.
 * @param {Uint8Array} roomSecret
 * @param {string} room
 * @returns {Promise<RoomKeys>}
 */
export async function deriveRoomKeys(roomSecret, room) {
  return {
    macKey: await hkdf(roomSecret, ZERO_SALT, lengthPrefixed(MAC_KEY_LABEL, nfc(room))),
    pairSalt: await hkdf(roomSecret, ZERO_SALT, lengthPrefixed(PAIR_SALT_LABEL, nfc(room))),
  };
}

/**
 * What a hello's MAC covers: room, the sender's id, its public key, timestamp, reply flag.
 * @param {string} room
 * @param {string} senderId
 * @param {Uint8Array} publicKey
 * @param {number} ts
 * @param {boolean} reply
 * @returns {Uint8Array}
 */
export function helloMacInput(room, senderId, publicKey, ts, reply) {
  return lengthPrefixed(HELLO_LABEL, nfc(room), utf8(senderId), publicKey, u64(ts), Uint8Array.of(reply ? 1 : 0));
}

/**
 * @param {Uint8Array} macKey
 * @returns {Promise<CryptoKey>}
 */
function importMacKey(macKey) {
  return subtle.importKey('raw', macKey, { name: 'HMAC', hash: 'SHA-256' }, false, ['sign', 'verify']);
}

/**
 * @param {Uint8Array} macKey
 * @param {string} room
 * @param {string} senderId
 * @param {Uint8Array} publicKey
 * @param {number} ts
 * @param {boolean} reply
 * @returns {Promise<Uint8Array>}
 */
export async function helloMac(macKey, room, senderId, publicKey, ts, reply) {
  const key = await importMacKey(macKey);
  return new Uint8Array(await subtle.sign('HMAC', key, helloMacInput(room, senderId, publicKey, ts, reply)));
}

/**
 * Lexicographic comparison of byte strings (what Python's sorted() does on bytes).
 * @param {Uint8Array} a
 * @param {Uint8Array} b
 * @returns {number}
 */
function compareBytes(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
}

/**
 * HKDF info for a pairwise key; the parties are sorted by id (UTF-8 bytes) so both compute it
 * alike.
 * @param {string} room
 * @param {string} idA
 * @param {Uint8Array} pubA
 * @param {string} idB
 * @param {Uint8Array} pubB
 * @returns {Uint8Array}
 */
export function pairwiseInfo(room, idA, pubA, idB, pubB) {
  let first = [utf8(idA), pubA];
  let second = [utf8(idB), pubB];
  const order = compareBytes(first[0], second[0]) || compareBytes(first[1], second[1]);
  if (order > 0) [first, second] = [second, first];
  return lengthPrefixed(PAIRWISE_LABEL, nfc(room), first[0], first[1], second[0], second[1]);
}

/**
 * The 32-byte AES-256-GCM key one pair of participants seals key messages with. The salt comes
 * from the passphrase, so the ECDH secret alone (which an SFU that swapped public keys would
 * hold) does not give it; the info binds ids and public keys.
 * @param {Uint8Array} sharedSecret  the ECDH x-coordinate (32 bytes)
 * @param {Uint8Array} pairSalt
 * @param {string} room
 * @param {string} idA
 * @param {Uint8Array} pubA
 * @param {string} idB
 * @param {Uint8Array} pubB
 * @returns {Promise<Uint8Array>}
 */
export function pairwiseKey(sharedSecret, pairSalt, room, idA, pubA, idB, pubB) {
  return hkdf(sharedSecret, pairSalt, pairwiseInfo(room, idA, pubA, idB, pubB));
}

/**
 * @param {string} room
 * @param {string} senderId
 * @param {string} recipientId
 * @param {bigint} kid
 * @param {number} generation
 * @returns {Uint8Array}
 */
export function keyMessageAad(room, senderId, recipientId, kid, generation) {
  return lengthPrefixed(KEY_LABEL, nfc(room), utf8(senderId), utf8(recipientId), u64(kid), u64(generation));
}

/**
 * A message as a relay payload: compact JSON, UTF-8, standard base64 with padding.
 * @param {Record<string, unknown>} message
 * @returns {string}
 */
export function encodePayload(message) {
  return toBase64(utf8(JSON.stringify(message)));
}

/**
 * The inverse of encodePayload; throws on anything else.
 * @param {string} payload
 * @returns {Record<string, any>}
 */
export function decodePayload(payload) {
  if (typeof payload !== 'string' || payload.length > MAX_PAYLOAD_CHARS) {
    throw new Malformed(`payload is not a string of at most ${MAX_PAYLOAD_CHARS} characters`);
  }
  let message;
  try {
    message = JSON.parse(strictDecoder.decode(fromBase64(payload)));
  } catch {
    throw new Malformed('payload is not base64 JSON');
  }
  if (typeof message !== 'object' || message === null || Array.isArray(message)) {
    throw new Malformed('payload is not a JSON object');
  }
  return message;
}

/**
 * @param {Record<string, any>} message
 * @param {string} name
 * @param {number} length
 * @returns {Uint8Array}
 */
function bytesField(message, name, length) {
  const raw = fromBase64(message[name]);
  if (raw.length !== length) throw new Malformed(`${name} must be ${length} bytes`);
  return raw;
}

/**
 * @param {Record<string, any>} message
 * @param {string} name
 * @returns {number}
 */
function intField(message, name) {
  const value = message[name];
  if (!Number.isSafeInteger(value) || value < 0) throw new Malformed(`${name} must be an integer in [0, 2^53)`);
  return value;
}

// --- State machine ---------------------------------------------------------------------------

/**
 * One generation of this participant's own media key.
 * @typedef {Object} SendKey
 * @property {bigint} kid
 * @property {Uint8Array} key
 * @property {number} generation
 */

/**
 * @typedef {Object} KeyExchangeOptions
 * @property {number} slot  the sender slot the control plane assigned (composeKid)
 * @property {(kid: bigint, key: Uint8Array) => void} [onSendKey]  protect own frames with this
 *   key from now on (post {type:'setSendKey'} to the worker)
 * @property {(senderId: string, kid: bigint) => void} [onKeyRemoved]  a superseded receive
 *   key's grace period is over (post {type:'removeReceiveKey'})
 * @property {(peerId: string) => void} [onPeerVerified]  the peer proved the passphrase
 * @property {number} [iterations]  PBKDF2 iterations; the same for everyone: tests only
 * @property {number} [switchDelayMs]  how long a rotated key is distributed before it is used
 * @property {number} [retainMs]  how long a superseded receive key stays usable
 * @property {(ms: number, fn: () => void) => void} [schedule]  timers (default setTimeout)
 * @property {() => number} [nowMs]  wall clock in ms (default Date.now)
 */

/**
 * @typedef {Object} Peer
 * @property {Uint8Array} publicKey
 * @property {number} ts
 * @property {CryptoKey} aead
 * @property {number} recvGeneration
 * @property {bigint|null} slot
 * @property {bigint|null} currentKid
 */

/**
 * One participant's side of the key exchange (docs/e2ee.md, "Key exchange").
 *
 * `send(to, payload)` must put `{type: 'relay', to, payload}` on the room WebSocket (`to`
 * null = everyone; leave `to` out of the JSON then). Feed every incoming relay message to
 * onRelay() and membership changes to peerJoined()/peerLeft(); call resync() after the room
 * socket resumed (messages sent while it was down are lost). Keys come out through the
 * callbacks: onKey(senderId, kid, key) for receive keys, options.onSendKey for our own key,
 * onPeerRejected(peerId, reason) for a peer that cannot be verified (a REJECT value).
 */
export class KeyExchange {
  /**
   * @param {string} roomName
   * @param {string} participantId  server-assigned; the relay's `from` for our messages
   * @param {string} passphrase  from the URL fragment; never sent anywhere
   * @param {(to: string|null, payloadB64: string) => void} send
   * @param {(senderId: string, kid: bigint, key: Uint8Array) => void} onKey
   * @param {(peerId: string, reason: string) => void} onPeerRejected
   * @param {KeyExchangeOptions} options
   */
  constructor(roomName, participantId, passphrase, send, onKey, onPeerRejected, options) {
    if (!participantId) throw new RangeError('participantId must not be empty');
    if (!passphrase) throw new RangeError('the room passphrase must not be empty');
    if (!options || options.slot === undefined) throw new RangeError('options.slot is required');
    composeKid(options.slot, 0); // validates the slot now rather than at the first rotation
    /** @readonly */ this.room = roomName;
    /** @readonly */ this.participantId = participantId;
    /** @private */ this.passphrase = passphrase;
    /** @private */ this.slot = options.slot;
    /** @private */ this.send = send;
    /** @private */ this.onKey = onKey;
    /** @private */ this.onPeerRejected = onPeerRejected;
    /** @private */ this.options = options;
    /** @private */ this.iterations = options.iterations ?? PBKDF2_ITERATIONS;
    /** @private */ this.switchDelayMs = options.switchDelayMs ?? 1000;
    /** @private */ this.retainMs = options.retainMs ?? 5000;
    /** @private */ this.schedule = options.schedule ?? ((ms, fn) => { setTimeout(fn, ms); });
    /** @private */ this.nowMs = options.nowMs ?? Date.now;

    /** @private @type {{macKey: CryptoKey, pairSalt: Uint8Array, privateKey: CryptoKey, publicKey: Uint8Array, ts: number} | null} */
    this.identity = null;
    /** @private */ this.generation = 0;
    /** @private @type {SendKey|null} */ this.current = null;
    /** @private @type {SendKey|null} */ this.pendingSend = null;
    /** @private @type {Map<string, Peer>} */ this.peers = new Map();
    /** @private @type {Set<string>} */ this.members = new Set();
    /** @private @type {Set<string>} */ this.answered = new Set();
    // KID -> {sender, key} of every receive key handed out and not yet removed; also how a KID
    // claimed by two peers is noticed.
    /** @private @type {Map<bigint, {sender: string, key: Uint8Array}>} */ this.receiveKeys = new Map();
    // Last accepted hello timestamp of peers that left, so a replay of their old hello does
    // not bring them back; a real rejoin announces with a newer timestamp.
    /** @private @type {Map<string, number>} */ this.tombstones = new Map();
    /** @private @type {Array<[string, string]>} */ this.early = [];
    /** @private @type {Map<string, Record<string, any>[]>} */ this.pending = new Map();
    /** @private @type {Promise<unknown>} */ this.queue = Promise.resolve();
  }

  /**
   * Run `op` after everything queued before it; the returned promise settles with it.
   * @private
   * @template T
   * @param {() => Promise<T>|T} op
   * @returns {Promise<T>}
   */
  enqueue(op) {
    const run = this.queue.then(op);
    this.queue = run.catch(() => {});
    return run;
  }

  /** Resolves once everything queued so far has been handled (for tests and shutdown). */
  idle() {
    return this.enqueue(() => {});
  }

  /** Derive the room keys, create generation 0 of our media key and announce ourselves. */
  start() {
    return this.enqueue(async () => {
      if (this.identity !== null) return;
      const secret = await deriveRoomSecret(this.room, this.passphrase, this.iterations);
      const { macKey, pairSalt } = await deriveRoomKeys(secret, this.room);
      // The private key is not extractable: it never needs to leave WebCrypto.
      const pair = /** @type {CryptoKeyPair} */ (
        await subtle.generateKey({ name: 'ECDH', namedCurve: 'P-256' }, false, ['deriveBits'])
      );
      this.identity = {
        macKey: await importMacKey(macKey),
        pairSalt,
        privateKey: pair.privateKey,
        publicKey: new Uint8Array(await subtle.exportKey('raw', pair.publicKey)),
        ts: this.nowMs(),
      };
      this.switchTo(this.newSendKey(0));
      this.send(null, await this.hello(false));
      const early = this.early;
      this.early = [];
      for (const [fromId, payload] of early) await this.handleRelay(fromId, payload);
    });
  }

  /**
   * Handle one relay message; `fromId` is the relay's `from` field.
   * @param {string} fromId
   * @param {string} payloadB64
   * @returns {Promise<void>}
   */
  onRelay(fromId, payloadB64) {
    return this.enqueue(() => this.handleRelay(fromId, payloadB64));
  }

  /**
   * The room says `peerId` joined. Nothing is sent: the joiner's own broadcast hello reaches
   * us (the relay delivers in order) and we answer that. The id is remembered so that
   * unverifiedPeers() can list members that never proved the passphrase.
   * @param {string} peerId
   * @returns {Promise<void>}
   */
  peerJoined(peerId) {
    return this.enqueue(() => {
      if (peerId !== this.participantId) this.members.add(peerId);
    });
  }

  /**
   * The room says `peerId` left: forget it, and rotate our key if it held it.
   * @param {string} peerId
   * @returns {Promise<void>}
   */
  peerLeft(peerId) {
    return this.enqueue(async () => {
      this.members.delete(peerId);
      this.answered.delete(peerId);
      this.pending.delete(peerId);
      const peer = this.peers.get(peerId);
      if (peer === undefined) return;
      this.peers.delete(peerId);
      this.rememberDeparture(peerId, peer.ts);
      for (const [kid, entry] of [...this.receiveKeys]) {
        if (entry.sender === peerId) this.retire(peerId, kid);
      }
      await this.rotateNow();
    });
  }

  /** Start a new key generation now (e.g. before the counter runs out). */
  rotate() {
    return this.enqueue(async () => {
      if (this.identity !== null) await this.rotateNow();
    });
  }

  /**
   * The key our frames are protected with now (null before start()).
   * @returns {SendKey|null}
   */
  currentSendKey() {
    return this.current;
  }

  /**
   * Peers that proved the passphrase and were sent our key.
   * @returns {Set<string>}
   */
  verifiedPeers() {
    return new Set(this.peers.keys());
  }

  /**
   * Members the room announced that have not proved the passphrase (yet).
   * @returns {Set<string>}
   */
  unverifiedPeers() {
    return new Set([...this.members].filter((id) => !this.peers.has(id)));
  }

  /**
   * Announce again, e.g. after the room socket resumed: messages sent to us while it was down
   * are lost, so every verified peer answers with its current key.
   * @returns {Promise<void>}
   */
  resync() {
    return this.enqueue(async () => {
      if (this.identity === null) return;
      // A newer timestamp is what tells peers this is not a replay of our earlier hello.
      this.identity = { ...this.identity, ts: Math.max(this.nowMs(), this.identity.ts + 1) };
      this.send(null, await this.hello(false));
    });
  }

  // --- messages --------------------------------------------------------------------------

  /**
   * @private
   * @param {string} fromId
   * @param {string} payload
   */
  async handleRelay(fromId, payload) {
    if (this.identity === null) {
      // The page may connect before the passphrase is entered; keep what arrives.
      if (this.early.length < MAX_EARLY_MESSAGES) this.early.push([fromId, payload]);
      return;
    }
    if (!fromId || fromId === this.participantId) return;
    try {
      const message = decodePayload(payload);
      if (message.v !== PROTOCOL_VERSION) {
        this.onPeerRejected(fromId, REJECT.UNSUPPORTED_VERSION);
        return;
      }
      if (message.t === 'hello') await this.handleHello(fromId, message);
      else if (message.t === 'key') await this.handleKey(fromId, message);
      else throw new Malformed('unknown message type');
    } catch (err) {
      if (!(err instanceof Malformed)) throw err;
      this.onPeerRejected(fromId, REJECT.MALFORMED);
    }
  }

  /**
   * @private
   * @returns {NonNullable<KeyExchange['identity']>}
   */
  own() {
    if (this.identity === null) throw new Error('KeyExchange.start() has not run');
    return this.identity;
  }

  /**
   * @private
   * @param {boolean} reply
   * @returns {Promise<string>}
   */
  async hello(reply) {
    const own = this.own();
    const input = helloMacInput(this.room, this.participantId, own.publicKey, own.ts, reply);
    const mac = new Uint8Array(await subtle.sign('HMAC', own.macKey, input));
    return encodePayload({
      v: PROTOCOL_VERSION, t: 'hello', pub: toBase64(own.publicKey), ts: own.ts, reply, mac: toBase64(mac),
    });
  }

  /**
   * @private
   * @param {string} fromId
   * @param {Record<string, any>} message
   */
  async handleHello(fromId, message) {
    const own = this.own();
    const publicKey = bytesField(message, 'pub', PUBLIC_KEY_LEN);
    const ts = intField(message, 'ts');
    const reply = message.reply;
    if (typeof reply !== 'boolean') throw new Malformed('reply must be a boolean');
    const mac = bytesField(message, 'mac', MAC_LEN);
    const input = helloMacInput(this.room, fromId, publicKey, ts, reply);
    if (!(await subtle.verify('HMAC', own.macKey, mac, input))) {
      this.onPeerRejected(fromId, REJECT.UNVERIFIED);
      await this.answerUnverified(fromId, reply);
      return;
    }
    const existing = this.peers.get(fromId);
    if (existing !== undefined) {
      // A duplicate (its reply to our hello carries the same ts) or a replay.
      if (ts <= existing.ts) return;
      if (equalBytes(existing.publicKey, publicKey)) {
        // The same session announcing again (resync): it may have missed our keys.
        existing.ts = ts;
        await this.sendCurrentKeys(fromId);
        return;
      }
    } else if (ts <= (this.tombstones.get(fromId) ?? -1)) {
      return; // a replay of a departed peer's hello
    }
    if (publicKey[0] !== 0x04) throw new Malformed('pub is not an uncompressed point');
    let peerPublic;
    try {
      peerPublic = await subtle.importKey('raw', publicKey, { name: 'ECDH', namedCurve: 'P-256' }, true, []);
    } catch {
      throw new Malformed('pub is not a P-256 point');
    }
    const shared = new Uint8Array(
      await subtle.deriveBits({ name: 'ECDH', public: peerPublic }, own.privateKey, 256),
    );
    const keyBytes = await pairwiseKey(
      shared, own.pairSalt, this.room, this.participantId, own.publicKey, fromId, publicKey,
    );
    const aead = await subtle.importKey('raw', keyBytes, 'AES-GCM', false, ['encrypt', 'decrypt']);
    if (existing !== undefined) {
      // The peer restarted under the same id: its old keys and generations are void.
      for (const [kid, entry] of [...this.receiveKeys]) {
        if (entry.sender === fromId) this.retire(fromId, kid);
      }
    }
    this.tombstones.delete(fromId);
    this.peers.set(fromId, { publicKey, ts, aead, recvGeneration: -1, slot: null, currentKid: null });
    this.members.add(fromId);
    this.options.onPeerVerified?.(fromId);
    if (!reply) this.send(fromId, await this.hello(true));
    await this.sendCurrentKeys(fromId);
    const queued = this.pending.get(fromId) ?? [];
    this.pending.delete(fromId);
    for (const pending of queued) {
      try {
        await this.handleKey(fromId, pending);
      } catch (err) {
        if (!(err instanceof Malformed)) throw err;
        this.onPeerRejected(fromId, REJECT.MALFORMED);
      }
    }
  }

  /**
   * Answer a failed hello with ours (no key, of course): its sender then sees our MAC fail too
   * and can tell its user the passphrase is probably wrong. Once per peer, so that a member
   * spamming hellos cannot make us spend our own relay rate limit on answers.
   * @private
   * @param {string} peerId
   * @param {boolean} reply
   */
  async answerUnverified(peerId, reply) {
    if (reply || this.peers.has(peerId) || this.answered.has(peerId)) return;
    if (this.answered.size >= MAX_TOMBSTONES) this.answered.clear();
    this.answered.add(peerId);
    this.send(peerId, await this.hello(true));
  }

  /**
   * The key in use and, during a rotation, the next one, so the peer can open frames both
   * before and after the switch.
   * @private
   * @param {string} peerId
   */
  async sendCurrentKeys(peerId) {
    for (const sendKey of [this.current, this.pendingSend]) {
      if (sendKey !== null) await this.sendKeyTo(peerId, sendKey);
    }
  }

  /**
   * @private
   * @param {string} peerId
   * @param {SendKey} sendKey
   */
  async sendKeyTo(peerId, sendKey) {
    const peer = this.peers.get(peerId);
    if (peer === undefined) return;
    const iv = globalThis.crypto.getRandomValues(new Uint8Array(IV_LEN));
    const additionalData = keyMessageAad(this.room, this.participantId, peerId, sendKey.kid, sendKey.generation);
    const sealed = new Uint8Array(
      await subtle.encrypt({ name: 'AES-GCM', iv, additionalData, tagLength: TAG_LEN * 8 }, peer.aead, sendKey.key),
    );
    this.send(peerId, encodePayload({
      v: PROTOCOL_VERSION,
      t: 'key',
      kid: `0x${sendKey.kid.toString(16)}`,
      gen: sendKey.generation,
      iv: toBase64(iv),
      ct: toBase64(sealed),
    }));
  }

  /**
   * @private
   * @param {string} fromId
   * @param {Record<string, any>} message
   */
  async handleKey(fromId, message) {
    const peer = this.peers.get(fromId);
    if (peer === undefined) {
      // A key can overtake its sender's hello only if the relay reorders; keep a few.
      if (this.pending.has(fromId) || this.pending.size < MAX_PENDING_PEERS) {
        const queue = this.pending.get(fromId) ?? [];
        if (queue.length < MAX_PENDING_PER_PEER) queue.push(message);
        this.pending.set(fromId, queue);
      }
      return;
    }
    if (typeof message.kid !== 'string' || !KID_RE.test(message.kid)) {
      throw new Malformed('kid must be a lower-case hex string 0x...');
    }
    const kid = BigInt(message.kid);
    const generation = intField(message, 'gen');
    const iv = bytesField(message, 'iv', IV_LEN);
    const sealed = bytesField(message, 'ct', MEDIA_KEY_LEN + TAG_LEN);
    const additionalData = keyMessageAad(this.room, fromId, this.participantId, kid, generation);
    let key;
    try {
      key = new Uint8Array(
        await subtle.decrypt({ name: 'AES-GCM', iv, additionalData, tagLength: TAG_LEN * 8 }, peer.aead, sealed),
      );
    } catch {
      this.onPeerRejected(fromId, REJECT.KEY_UNAUTHENTICATED);
      return;
    }
    if (generation <= peer.recvGeneration) return; // a replay or a duplicate: never roll back
    const bits = BigInt(KID_GENERATION_BITS);
    const slot = kid >> bits;
    if ((kid & ((1n << bits) - 1n)) !== BigInt(generation) % (1n << bits)
      || (peer.slot !== null && slot !== peer.slot)) {
      this.onPeerRejected(fromId, REJECT.BAD_KID);
      return;
    }
    const owner = this.receiveKeys.get(kid);
    if (owner !== undefined && owner.sender !== fromId) {
      this.onPeerRejected(fromId, REJECT.KID_CONFLICT);
      return;
    }
    const previous = peer.currentKid;
    peer.recvGeneration = generation;
    peer.slot = slot;
    peer.currentKid = kid;
    this.receiveKeys.set(kid, { sender: fromId, key });
    this.onKey(fromId, kid, key);
    if (previous !== null && previous !== kid) this.retire(fromId, previous);
  }

  // --- keys ------------------------------------------------------------------------------

  /**
   * @private
   * @param {number} generation
   * @returns {SendKey}
   */
  newSendKey(generation) {
    if (!Number.isSafeInteger(generation)) throw new RangeError('key generation exhausted');
    const key = globalThis.crypto.getRandomValues(new Uint8Array(MEDIA_KEY_LEN));
    return { kid: composeKid(this.slot, generation), key, generation };
  }

  /** @private */
  async rotateNow() {
    this.generation += 1;
    const next = this.newSendKey(this.generation);
    this.pendingSend = next;
    // Distribute first and switch later, so receivers hold the key before frames use it.
    for (const peerId of [...this.peers.keys()]) await this.sendKeyTo(peerId, next);
    this.later(this.switchDelayMs, () => this.switchTo(next));
  }

  /**
   * @private
   * @param {SendKey} next
   */
  switchTo(next) {
    if (this.pendingSend === next) this.pendingSend = null;
    if (this.current !== null && next.generation <= this.current.generation) return;
    this.current = next;
    this.options.onSendKey?.(next.kid, next.key);
  }

  /**
   * @private
   * @param {string} sender
   * @param {bigint} kid
   */
  retire(sender, kid) {
    const entry = this.receiveKeys.get(kid);
    if (entry === undefined || entry.sender !== sender) return;
    this.later(this.retainMs, () => {
      // A newer key may have taken this KID meanwhile (16 generations on); keep that one.
      if (this.receiveKeys.get(kid) !== entry) return;
      this.receiveKeys.delete(kid);
      this.options.onKeyRemoved?.(sender, kid);
    });
  }

  /**
   * Run `fn` after `ms`, on the queue so it never interleaves with a message being handled;
   * at once (we are already on the queue) when `ms` is 0.
   * @private
   * @param {number} ms
   * @param {() => void} fn
   */
  later(ms, fn) {
    if (ms <= 0) fn();
    else this.schedule(ms, () => { this.enqueue(fn); });
  }

  /**
   * @private
   * @param {string} peerId
   * @param {number} ts
   */
  rememberDeparture(peerId, ts) {
    this.tombstones.delete(peerId);
    this.tombstones.set(peerId, ts);
    while (this.tombstones.size > MAX_TOMBSTONES) {
      this.tombstones.delete(/** @type {string} */ (this.tombstones.keys().next().value));
    }
  }
}

/**
 * @param {Uint8Array} a
 * @param {Uint8Array} b
 * @returns {boolean}
 */
function equalBytes(a, b) {
  return a.length === b.length && compareBytes(a, b) === 0;
}
