// Small helpers shared by the Node tests (node --test tests/js/).
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Repository root (tests/js/ is two levels below it). */
export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

/**
 * @param {string} hex
 * @returns {Uint8Array}
 */
export function fromHex(hex) {
  if (hex.length % 2 !== 0) throw new Error(`odd-length hex ${hex}`);
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/**
 * @param {Uint8Array} bytes
 * @returns {string}
 */
export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * Read a JSON file relative to the repository root.
 * @param {string} path
 * @returns {any}
 */
export function readJson(path) {
  return JSON.parse(readFileSync(join(ROOT, path), 'utf8'));
}
