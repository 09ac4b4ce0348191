// A browser participant without the browser, for cross-language tests
// (tests/client/test_keyexchange.py). It wires KeyExchange to a FrameCryptor the way the page
// wires KeyExchange to worker.js, and speaks JSON lines on stdin/stdout:
//
// in:  {"op": "init", "room", "id", "passphrase", "slot", "iterations"?}
//      {"op": "start"} | {"op": "relay", "from", "payload"} | {"op": "joined", "id"}
//      {"op": "left", "id"} | {"op": "timers"}   (runs every timer due so far)
//      {"op": "protect", "frames": [{"kind", "hex"}]} | {"op": "unprotect", "frames": [...]}
// out: {"ev": "send", "to", "payload"} | {"ev": "key", "sender", "kid", "key"}
//      {"ev": "sendKey", "kid", "key"} | {"ev": "removed", "sender", "kid"}
//      {"ev": "rejected", "peer", "reason"} | {"ev": "verified", "peer"}
//      {"ev": "frames", "results": [{"status", "hex"?}]} | {"ev": "error", "message"}
//      and {"ev": "done"} after each command's events.
// KIDs are hex strings ("0x10"), byte strings are hex.
import { createInterface } from 'node:readline';

import { FrameCryptor } from '../../sfu/web/e2ee/frame-cryptor.js';
import { KeyExchange } from '../../sfu/web/e2ee/keyexchange.js';

/** @param {Uint8Array} bytes */
const hex = (bytes) => Buffer.from(bytes).toString('hex');
/** @param {bigint} kid */
const kidHex = (kid) => `0x${kid.toString(16)}`;
/** @param {Record<string, unknown>} event */
const emit = (event) => { process.stdout.write(`${JSON.stringify(event)}\n`); };

/** @type {KeyExchange|null} */
let kx = null;
const cryptor = new FrameCryptor({ unknownKidWaitMs: 0 });
/** @type {Array<() => void>} */
let timers = [];
/** Key installs run asynchronously; a command's answer waits for them. @type {Promise<unknown>[]} */
let installs = [];

/** @param {any} cmd */
async function handle(cmd) {
  switch (cmd.op) {
    case 'init':
      kx = new KeyExchange(
        cmd.room, cmd.id, cmd.passphrase,
        (to, payload) => emit({ ev: 'send', to, payload }),
        (sender, kid, key) => {
          installs.push(cryptor.addReceiveKey(kid, key));
          emit({ ev: 'key', sender, kid: kidHex(kid), key: hex(key) });
        },
        (peer, reason) => emit({ ev: 'rejected', peer, reason }),
        {
          slot: cmd.slot,
          iterations: cmd.iterations,
          schedule: (_ms, fn) => { timers.push(fn); },
          onSendKey: (kid, key) => {
            installs.push(cryptor.setSendKey(kid, key));
            emit({ ev: 'sendKey', kid: kidHex(kid), key: hex(key) });
          },
          onKeyRemoved: (sender, kid) => {
            cryptor.removeReceiveKey(kid);
            emit({ ev: 'removed', sender, kid: kidHex(kid) });
          },
          onPeerVerified: (peer) => emit({ ev: 'verified', peer }),
        },
      );
      return;
    case 'start': return kx.start();
    case 'relay': return kx.onRelay(cmd.from, cmd.payload);
    case 'joined': return kx.peerJoined(cmd.id);
    case 'left': return kx.peerLeft(cmd.id);
    case 'timers': {
      const due = timers;
      timers = [];
      for (const fn of due) fn();
      return kx.idle();
    }
    case 'protect':
    case 'unprotect': {
      const results = [];
      for (const frame of cmd.frames) {
        const data = Uint8Array.from(Buffer.from(frame.hex, 'hex'));
        const r = cmd.op === 'protect'
          ? await cryptor.encryptFrame(data, frame.kind)
          : await cryptor.decryptFrame(data, frame.kind);
        results.push(r.data === undefined ? { status: r.status } : { status: r.status, hex: hex(r.data) });
      }
      emit({ ev: 'frames', results });
      return;
    }
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

// One command at a time, in order: read a line, handle it fully, answer "done".
const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  try {
    await handle(JSON.parse(line));
    await Promise.all(installs);
    installs = [];
  } catch (err) {
    emit({ ev: 'error', message: err instanceof Error ? err.stack : String(err) });
  }
  emit({ ev: 'done' });
}
