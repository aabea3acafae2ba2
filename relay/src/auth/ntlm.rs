//! The NTLM messages and response checks of [MS-NLMP], as SMTP AUTH carries them
//! ([MS-SMTPNTLM]): parsing the client's NEGOTIATE and AUTHENTICATE messages, building the
//! server's CHALLENGE, and checking an NTLMv2 (or, only when a service allows it, NTLMv1)
//! response and the message integrity code against the account's NT hash. SMTP uses NTLM for
//! authentication only: no signing or sealing follows, so the session key serves only the MIC.
//!
//! Which account a user and domain name, and what a mismatch means, is [`super::Exchange`]'s
//! business; nothing here knows about accounts.

use des::cipher::{BlockEncrypt, KeyInit};
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use rc4::{Rc4, StreamCipher};
use subtle::ConstantTimeEq as _;

const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";

/// Negotiate flags ([MS-NLMP] §2.2.2.5).
pub mod flags {
    pub const UNICODE: u32 = 0x0000_0001;
    pub const OEM: u32 = 0x0000_0002;
    pub const REQUEST_TARGET: u32 = 0x0000_0004;
    pub const SIGN: u32 = 0x0000_0010;
    pub const SEAL: u32 = 0x0000_0020;
    pub const NTLM: u32 = 0x0000_0200;
    pub const ALWAYS_SIGN: u32 = 0x0000_8000;
    pub const TARGET_TYPE_DOMAIN: u32 = 0x0001_0000;
    pub const EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
    pub const TARGET_INFO: u32 = 0x0080_0000;
    pub const VERSION: u32 = 0x0200_0000;
    pub const KEY_128: u32 = 0x2000_0000;
    pub const KEY_EXCH: u32 = 0x4000_0000;
    pub const KEY_56: u32 = 0x8000_0000;
}

/// AV pair identifiers ([MS-NLMP] §2.2.2.1).
mod av {
    pub const EOL: u16 = 0;
    pub const NB_COMPUTER_NAME: u16 = 1;
    pub const NB_DOMAIN_NAME: u16 = 2;
    pub const DNS_COMPUTER_NAME: u16 = 3;
    pub const DNS_DOMAIN_NAME: u16 = 4;
    pub const FLAGS: u16 = 6;
    pub const TIMESTAMP: u16 = 7;
}

/// `MsvAvFlags` bit: the AUTHENTICATE message carries a MIC.
const AV_FLAG_MIC: u32 = 0x2;
/// Where the MIC sits in an AUTHENTICATE message that has one (after the 64-byte header and
/// the 8-byte version).
const MIC_OFFSET: usize = 72;
/// Seconds from 1601-01-01 (FILETIME's epoch) to 1970-01-01.
const FILETIME_UNIX_OFFSET: u64 = 11_644_473_600;

fn u16_at(msg: &[u8], at: usize) -> Result<u16, String> {
    msg.get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| format!("message ends at byte {} inside a field", msg.len()))
}

fn u32_at(msg: &[u8], at: usize) -> Result<u32, String> {
    msg.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| format!("message ends at byte {} inside a field", msg.len()))
}

/// The payload a security buffer (length, maximum length, offset) at `at` points to.
fn buffer(msg: &[u8], at: usize) -> Result<&[u8], String> {
    let len = usize::from(u16_at(msg, at)?);
    let offset = u32_at(msg, at + 4)? as usize;
    if len == 0 {
        return Ok(&[]);
    }
    offset
        .checked_add(len)
        .and_then(|end| msg.get(offset..end))
        .ok_or_else(|| format!("a field points outside the message ({len} bytes at {offset})"))
}

fn header(msg: &[u8], kind: u32) -> Result<(), String> {
    if msg.get(..8) != Some(SIGNATURE.as_slice()) {
        return Err("not an NTLMSSP message".into());
    }
    let found = u32_at(msg, 8)?;
    if found != kind {
        return Err(format!(
            "NTLM message type {found} where type {kind} belongs"
        ));
    }
    Ok(())
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// A string field in the encoding the flags chose: UTF-16LE, or the OEM code page, read as
/// Latin-1 (which is what clients that use OEM strings widen to for the NTLMv2 hash).
fn decode(bytes: &[u8], unicode: bool) -> Result<String, String> {
    if unicode {
        if !bytes.len().is_multiple_of(2) {
            return Err("odd-length UTF-16 string".into());
        }
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).map_err(|_| "invalid UTF-16 string".into())
    } else {
        Ok(bytes.iter().map(|&b| char::from(b)).collect())
    }
}

/// The client's NEGOTIATE message (type 1): only its flags matter to the server.
#[derive(Clone, Debug)]
pub struct Negotiate {
    pub flags: u32,
}

impl Negotiate {
    pub fn parse(msg: &[u8]) -> Result<Self, String> {
        header(msg, 1)?;
        Ok(Negotiate {
            flags: u32_at(msg, 12)?,
        })
    }
}

/// What the server says about itself in the CHALLENGE message.
pub struct ServerNames<'a> {
    /// NetBIOS domain name (the target name).
    pub nb_domain: &'a str,
    /// NetBIOS computer name.
    pub nb_computer: &'a str,
    /// DNS domain name.
    pub dns_domain: &'a str,
    /// DNS host name.
    pub dns_computer: &'a str,
}

/// Builds the CHALLENGE message (type 2) answering `negotiate`, with `server_challenge` and a
/// target-info block that carries a timestamp (which tells NTLMv2 clients to send a MIC).
pub fn challenge(
    negotiate: &Negotiate,
    server_challenge: [u8; 8],
    names: &ServerNames<'_>,
    now_unix: u64,
) -> Vec<u8> {
    let asked = negotiate.flags;
    let unicode = asked & flags::UNICODE != 0;
    let mut f = flags::NTLM
        | flags::REQUEST_TARGET
        | flags::ALWAYS_SIGN
        | flags::TARGET_TYPE_DOMAIN
        | flags::TARGET_INFO
        | flags::VERSION
        | if unicode { flags::UNICODE } else { flags::OEM };
    // Granted only when asked for: the client's choice decides which NTLMv1 computation and
    // whether the session key is exchanged (which the MIC needs).
    f |= asked
        & (flags::EXTENDED_SESSIONSECURITY
            | flags::KEY_128
            | flags::KEY_56
            | flags::KEY_EXCH
            | flags::SIGN
            | flags::SEAL);
    let target = if unicode {
        utf16(names.nb_domain)
    } else {
        names.nb_domain.bytes().collect()
    };
    let mut info = Vec::new();
    let mut pair = |id: u16, value: &[u8]| {
        info.extend_from_slice(&id.to_le_bytes());
        info.extend_from_slice(&(value.len() as u16).to_le_bytes());
        info.extend_from_slice(value);
    };
    pair(av::NB_DOMAIN_NAME, &utf16(names.nb_domain));
    pair(av::NB_COMPUTER_NAME, &utf16(names.nb_computer));
    pair(av::DNS_DOMAIN_NAME, &utf16(names.dns_domain));
    pair(av::DNS_COMPUTER_NAME, &utf16(names.dns_computer));
    let filetime = now_unix
        .saturating_add(FILETIME_UNIX_OFFSET)
        .saturating_mul(10_000_000);
    pair(av::TIMESTAMP, &filetime.to_le_bytes());
    pair(av::EOL, &[]);

    const HEADER: usize = 56;
    let mut msg = Vec::with_capacity(HEADER + target.len() + info.len());
    msg.extend_from_slice(SIGNATURE);
    msg.extend_from_slice(&2u32.to_le_bytes());
    let buf = |msg: &mut Vec<u8>, len: usize, offset: usize| {
        msg.extend_from_slice(&(len as u16).to_le_bytes());
        msg.extend_from_slice(&(len as u16).to_le_bytes());
        msg.extend_from_slice(&(offset as u32).to_le_bytes());
    };
    buf(&mut msg, target.len(), HEADER);
    msg.extend_from_slice(&f.to_le_bytes());
    msg.extend_from_slice(&server_challenge);
    msg.extend_from_slice(&[0; 8]);
    buf(&mut msg, info.len(), HEADER + target.len());
    // Version: 10.0 build 20348, NTLMSSP revision 15.
    msg.extend_from_slice(&[10, 0, 0x7c, 0x4f, 0, 0, 0, 15]);
    msg.extend_from_slice(&target);
    msg.extend_from_slice(&info);
    msg
}

/// The client's AUTHENTICATE message (type 3), parsed.
#[derive(Clone, Debug)]
pub struct Authenticate {
    pub flags: u32,
    pub lm_response: Vec<u8>,
    pub nt_response: Vec<u8>,
    /// The NT domain the client presents, as sent (may be empty).
    pub domain: String,
    /// The user name, as sent.
    pub user: String,
    pub workstation: String,
    pub encrypted_session_key: Vec<u8>,
    /// The whole message, for the MIC.
    raw: Vec<u8>,
}

impl Authenticate {
    pub fn parse(msg: &[u8]) -> Result<Self, String> {
        header(msg, 3)?;
        let flags = u32_at(msg, 60)?;
        let unicode = flags & flags::UNICODE != 0;
        Ok(Authenticate {
            flags,
            lm_response: buffer(msg, 12)?.to_vec(),
            nt_response: buffer(msg, 20)?.to_vec(),
            domain: decode(buffer(msg, 28)?, unicode)?,
            user: decode(buffer(msg, 36)?, unicode)?,
            workstation: decode(buffer(msg, 44)?, unicode)?,
            encrypted_session_key: buffer(msg, 52)?.to_vec(),
            raw: msg.to_vec(),
        })
    }

    /// The kind of response the client sent.
    pub fn response_kind(&self) -> ResponseKind {
        match self.nt_response.len() {
            0 => ResponseKind::Anonymous,
            24 => ResponseKind::V1,
            n if n > 24 => ResponseKind::V2,
            _ => ResponseKind::Malformed,
        }
    }

    /// Whether the NTLMv2 blob's `MsvAvFlags` announce a MIC.
    fn has_mic(&self) -> bool {
        // NTProofStr (16), then the blob: 28 bytes of fixed fields, then AV pairs.
        let Some(mut pairs) = self.nt_response.get(16 + 28..) else {
            return false;
        };
        while pairs.len() >= 4 {
            let id = u16::from_le_bytes([pairs[0], pairs[1]]);
            let len = usize::from(u16::from_le_bytes([pairs[2], pairs[3]]));
            let Some(value) = pairs.get(4..4 + len) else {
                return false;
            };
            if id == av::EOL {
                return false;
            }
            if id == av::FLAGS && len == 4 {
                let v = u32::from_le_bytes([value[0], value[1], value[2], value[3]]);
                return v & AV_FLAG_MIC != 0;
            }
            pairs = &pairs[4 + len..];
        }
        false
    }
}

/// The response types an AUTHENTICATE message can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseKind {
    /// No NT response (anonymous, or LM only).
    Anonymous,
    /// The 24-byte NTLMv1 response.
    V1,
    /// An NTLMv2 response (16-byte proof and a blob).
    V2,
    /// Any other length.
    Malformed,
}

/// The 16 bytes of an NT hash as the credentials carry it (hex); `None` for anything else.
pub fn nt_hash_bytes(hex_hash: &str) -> Option<[u8; 16]> {
    <[u8; 16]>::try_from(hex::decode(hex_hash).ok()?).ok()
}

fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    // HMAC accepts keys of any length; the zero fallback only fails the comparison.
    let Ok(mut m) = <Hmac<Md5> as Mac>::new_from_slice(key) else {
        return [0; 16];
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Why a response did not check out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// The response does not match the NT hash: a wrong password (or user/domain spelled
    /// differently from what the client hashed).
    Response,
    /// The response matched but the MIC did not: the messages were altered on the way.
    Mic,
    /// The message is malformed.
    Malformed(String),
}

/// Checks the response in `auth` against `nt_hash` for `server_challenge`: NTLMv2 always,
/// NTLMv1 when `allow_v1`. Callers decide what to do with other kinds first.
pub fn verify(
    auth: &Authenticate,
    nt_hash: &[u8; 16],
    server_challenge: &[u8; 8],
    negotiate_raw: &[u8],
    challenge_raw: &[u8],
) -> Result<(), Mismatch> {
    let session_base_key = match auth.response_kind() {
        ResponseKind::V2 => verify_v2(auth, nt_hash, server_challenge)?,
        ResponseKind::V1 => verify_v1(auth, nt_hash, server_challenge)?,
        ResponseKind::Anonymous | ResponseKind::Malformed => {
            return Err(Mismatch::Malformed(format!(
                "NT response of {} bytes",
                auth.nt_response.len()
            )))
        }
    };
    if auth.response_kind() == ResponseKind::V2 && auth.has_mic() {
        check_mic(auth, &session_base_key, negotiate_raw, challenge_raw)?;
    }
    Ok(())
}

/// NTLMv2 ([MS-NLMP] §3.3.2): the proof is HMAC-MD5 over the server challenge and the blob,
/// keyed with HMAC-MD5(NT hash, UPPER(user) ‖ domain). Returns the session base key.
fn verify_v2(
    auth: &Authenticate,
    nt_hash: &[u8; 16],
    server_challenge: &[u8; 8],
) -> Result<[u8; 16], Mismatch> {
    let (proof, blob) = auth.nt_response.split_at(16);
    let identity = utf16(&(auth.user.to_uppercase() + &auth.domain));
    let key = hmac_md5(nt_hash, &[&identity]);
    let expected = hmac_md5(&key, &[server_challenge, blob]);
    if !bool::from(expected.ct_eq(proof)) {
        return Err(Mismatch::Response);
    }
    Ok(hmac_md5(&key, &[&expected]))
}

/// NTLMv1 ([MS-NLMP] §3.3.1): DES of the challenge (or, with extended session security, of
/// MD5(server challenge ‖ client challenge)) under three keys cut from the NT hash.
fn verify_v1(
    auth: &Authenticate,
    nt_hash: &[u8; 16],
    server_challenge: &[u8; 8],
) -> Result<[u8; 16], Mismatch> {
    let data: [u8; 8] = if auth.flags & flags::EXTENDED_SESSIONSECURITY != 0 {
        let client = auth
            .lm_response
            .get(..8)
            .ok_or_else(|| Mismatch::Malformed("NTLMv1 without a client challenge".into()))?;
        let digest = Md5::new()
            .chain_update(server_challenge)
            .chain_update(client)
            .finalize();
        let mut d = [0; 8];
        d.copy_from_slice(&digest[..8]);
        d
    } else {
        *server_challenge
    };
    if !bool::from(desl(nt_hash, &data).ct_eq(&auth.nt_response)) {
        return Err(Mismatch::Response);
    }
    Ok(Md5::digest(nt_hash).into())
}

/// DESL ([MS-NLMP] §6): the 16-byte key padded to 21 bytes, cut into three 7-byte DES keys.
fn desl(key: &[u8; 16], data: &[u8; 8]) -> [u8; 24] {
    let mut k = [0u8; 21];
    k[..16].copy_from_slice(key);
    let mut out = [0u8; 24];
    for (i, chunk) in k.chunks_exact(7).enumerate() {
        let mut block = des::cipher::generic_array::GenericArray::clone_from_slice(data);
        if let Ok(cipher) = des::Des::new_from_slice(&des_key(chunk)) {
            cipher.encrypt_block(&mut block);
        }
        out[i * 8..i * 8 + 8].copy_from_slice(&block);
    }
    out
}

/// Spreads 56 key bits over 8 bytes (DES ignores the low parity bit).
fn des_key(k: &[u8]) -> [u8; 8] {
    let bits = k.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    let mut out = [0u8; 8];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (((bits >> (49 - 7 * i)) & 0x7f) as u8) << 1;
    }
    out
}

/// The MIC ([MS-NLMP] §3.2.5.1.2): HMAC-MD5 under the exported session key over all three
/// messages, with the MIC field zeroed.
fn check_mic(
    auth: &Authenticate,
    session_base_key: &[u8; 16],
    negotiate_raw: &[u8],
    challenge_raw: &[u8],
) -> Result<(), Mismatch> {
    let mut exported = *session_base_key;
    if auth.flags & flags::KEY_EXCH != 0 {
        if auth.encrypted_session_key.len() != 16 {
            return Err(Mismatch::Malformed(
                "key exchange without a 16-byte session key".into(),
            ));
        }
        exported.copy_from_slice(&auth.encrypted_session_key);
        let Ok(mut rc4) = Rc4::<rc4::consts::U16>::new_from_slice(session_base_key) else {
            return Err(Mismatch::Malformed("RC4 key".into()));
        };
        rc4.apply_keystream(&mut exported);
    }
    let Some(given) = auth.raw.get(MIC_OFFSET..MIC_OFFSET + 16) else {
        return Err(Mismatch::Malformed("MIC announced but missing".into()));
    };
    let mut zeroed = auth.raw.clone();
    zeroed[MIC_OFFSET..MIC_OFFSET + 16].fill(0);
    let mic = hmac_md5(&exported, &[negotiate_raw, challenge_raw, &zeroed]);
    if bool::from(mic.ct_eq(given)) {
        Ok(())
    } else {
        Err(Mismatch::Mic)
    }
}

/// A client side of the exchange, for the tests and the fuzz harness (which builds valid
/// messages around fuzzed names): NTLMv2 (with a MIC and key exchange when `with_mic`) or
/// NTLMv1. Not used by the relay itself.
#[doc(hidden)]
pub mod client {
    use super::*;

    pub fn negotiate(unicode: bool) -> Vec<u8> {
        let f = flags::NTLM
            | flags::REQUEST_TARGET
            | flags::EXTENDED_SESSIONSECURITY
            | flags::KEY_128
            | flags::KEY_EXCH
            | flags::ALWAYS_SIGN
            | if unicode { flags::UNICODE } else { flags::OEM };
        let mut m = SIGNATURE.to_vec();
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&f.to_le_bytes());
        m.extend_from_slice(&[0; 16]);
        m
    }

    pub struct Options<'a> {
        pub user: &'a str,
        pub domain: &'a str,
        pub password: &'a str,
        pub v1: bool,
        pub with_mic: bool,
    }

    pub fn authenticate(negotiate_raw: &[u8], challenge_raw: &[u8], o: &Options<'_>) -> Vec<u8> {
        let chal_flags = u32_at(challenge_raw, 20).unwrap_or(0);
        let unicode = chal_flags & flags::UNICODE != 0;
        let mut server_challenge = [0u8; 8];
        if let Some(c) = challenge_raw.get(24..32) {
            server_challenge.copy_from_slice(c);
        }
        let target_info = buffer(challenge_raw, 40).unwrap_or(&[]).to_vec();
        let nt_hash = nt_hash_bytes(mailrelay_crds::verifier::nt_hash(o.password).expose())
            .unwrap_or([0; 16]);
        let client_challenge = [0xaa; 8];
        let (lm, nt, base_key) = if o.v1 {
            let digest = Md5::new()
                .chain_update(server_challenge)
                .chain_update(client_challenge)
                .finalize();
            let mut d = [0; 8];
            d.copy_from_slice(&digest[..8]);
            let mut lm = client_challenge.to_vec();
            lm.extend_from_slice(&[0; 16]);
            (lm, desl(&nt_hash, &d).to_vec(), Md5::digest(nt_hash).into())
        } else {
            // The server's target info, plus MsvAvFlags announcing the MIC.
            let mut info = Vec::new();
            let mut rest = target_info.as_slice();
            while rest.len() >= 4 {
                let id = u16::from_le_bytes([rest[0], rest[1]]);
                let len = usize::from(u16::from_le_bytes([rest[2], rest[3]]));
                if id == av::EOL || rest.len() < 4 + len {
                    break;
                }
                info.extend_from_slice(&rest[..4 + len]);
                rest = &rest[4 + len..];
            }
            if o.with_mic {
                info.extend_from_slice(&av::FLAGS.to_le_bytes());
                info.extend_from_slice(&4u16.to_le_bytes());
                info.extend_from_slice(&AV_FLAG_MIC.to_le_bytes());
            }
            info.extend_from_slice(&[0; 4]);
            let mut blob = vec![1, 1, 0, 0, 0, 0, 0, 0];
            blob.extend_from_slice(&[0; 8]);
            blob.extend_from_slice(&client_challenge);
            blob.extend_from_slice(&[0; 4]);
            blob.extend_from_slice(&info);
            blob.extend_from_slice(&[0; 4]);
            let key = hmac_md5(&nt_hash, &[&utf16(&(o.user.to_uppercase() + o.domain))]);
            let proof = hmac_md5(&key, &[&server_challenge, &blob]);
            let mut nt = proof.to_vec();
            nt.extend_from_slice(&blob);
            (vec![0; 24], nt, hmac_md5(&key, &[&proof]))
        };
        let exported = [0x55u8; 16];
        let mut encrypted = exported;
        if let Ok(mut rc4) = Rc4::<rc4::consts::U16>::new_from_slice(&base_key) {
            rc4.apply_keystream(&mut encrypted);
        }
        let enc = |s: &str| -> Vec<u8> {
            if unicode {
                utf16(s)
            } else {
                s.bytes().collect()
            }
        };
        let (domain, user, ws) = (enc(o.domain), enc(o.user), enc("WS1"));
        let f = chal_flags | if o.v1 { 0 } else { flags::KEY_EXCH };
        let payloads: [&[u8]; 6] = [&lm, &nt, &domain, &user, &ws, &encrypted];
        let mut m = SIGNATURE.to_vec();
        m.extend_from_slice(&3u32.to_le_bytes());
        let mut offset = 88usize;
        for p in payloads {
            m.extend_from_slice(&(p.len() as u16).to_le_bytes());
            m.extend_from_slice(&(p.len() as u16).to_le_bytes());
            m.extend_from_slice(&(offset as u32).to_le_bytes());
            offset += p.len();
        }
        m.extend_from_slice(&f.to_le_bytes());
        m.extend_from_slice(&[10, 0, 0x7c, 0x4f, 0, 0, 0, 15]);
        m.extend_from_slice(&[0; 16]);
        for p in payloads {
            m.extend_from_slice(p);
        }
        if o.with_mic && !o.v1 {
            let mic = hmac_md5(&exported, &[negotiate_raw, challenge_raw, &m]);
            if let Some(field) = m.get_mut(MIC_OFFSET..MIC_OFFSET + 16) {
                field.copy_from_slice(&mic);
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NT_HASH_PASSWORD: [u8; 16] = [
        0xa4, 0xf4, 0x9c, 0x40, 0x65, 0x10, 0xbd, 0xca, 0xb6, 0x82, 0x4e, 0xe7, 0xc3, 0x0f, 0xd8,
        0x52,
    ];
    const SERVER_CHALLENGE: [u8; 8] = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];

    fn auth_with(nt_response: Vec<u8>, lm: Vec<u8>, flags: u32) -> Authenticate {
        Authenticate {
            flags,
            lm_response: lm,
            nt_response,
            domain: "Domain".into(),
            user: "User".into(),
            workstation: "COMPUTER".into(),
            encrypted_session_key: Vec::new(),
            raw: Vec::new(),
        }
    }

    /// [MS-NLMP] §4.2.4: NTLMv2 with the specification's user, domain, password, challenges,
    /// zero time and target info (NetBIOS domain "Domain", computer "Server").
    #[test]
    fn ntlmv2_matches_the_specification() {
        let mut info = Vec::new();
        for (id, v) in [
            (av::NB_DOMAIN_NAME, "Domain"),
            (av::NB_COMPUTER_NAME, "Server"),
        ] {
            let v = utf16(v);
            info.extend_from_slice(&id.to_le_bytes());
            info.extend_from_slice(&(v.len() as u16).to_le_bytes());
            info.extend_from_slice(&v);
        }
        info.extend_from_slice(&[0; 4]);
        let mut blob = vec![1, 1, 0, 0, 0, 0, 0, 0];
        blob.extend_from_slice(&[0; 8]);
        blob.extend_from_slice(&[0xaa; 8]);
        blob.extend_from_slice(&[0; 4]);
        blob.extend_from_slice(&info);
        blob.extend_from_slice(&[0; 4]);
        let proof = hex::decode("68cd0ab851e51c96aabc927bebef6a1c").unwrap_or_default();
        let mut nt = proof.clone();
        nt.extend_from_slice(&blob);
        let auth = auth_with(nt.clone(), Vec::new(), flags::UNICODE);
        let key = verify_v2(&auth, &NT_HASH_PASSWORD, &SERVER_CHALLENGE);
        assert_eq!(
            key.map(hex::encode),
            Ok("8de40ccadbc14a82f15cb0ad0de95ca3".to_string()),
            "session base key of §4.2.4.1.3"
        );
        // The user name is case-insensitive (upper-cased), the domain is not.
        let mut other = auth.clone();
        other.user = "USER".into();
        assert!(verify_v2(&other, &NT_HASH_PASSWORD, &SERVER_CHALLENGE).is_ok());
        other.domain = "DOMAIN".into();
        assert_eq!(
            verify_v2(&other, &NT_HASH_PASSWORD, &SERVER_CHALLENGE),
            Err(Mismatch::Response)
        );
        let mut wrong = [0u8; 16];
        wrong.copy_from_slice(&NT_HASH_PASSWORD);
        wrong[0] ^= 1;
        assert_eq!(
            verify_v2(&auth, &wrong, &SERVER_CHALLENGE),
            Err(Mismatch::Response)
        );
    }

    /// [MS-NLMP] §4.2.2.2.1 (NTLMv1) and §4.2.3.2.2 (NTLMv1 with extended session security).
    #[test]
    fn ntlmv1_matches_the_specification() {
        let plain =
            hex::decode("67c43011f30298a2ad35ece64f16331c44bdbed927841f94").unwrap_or_default();
        let auth = auth_with(plain, Vec::new(), flags::UNICODE);
        assert!(verify_v1(&auth, &NT_HASH_PASSWORD, &SERVER_CHALLENGE).is_ok());

        let ess =
            hex::decode("7537f803ae367128ca458204bde7caf81e97ed2683267232").unwrap_or_default();
        let mut lm = vec![0xaa; 8];
        lm.extend_from_slice(&[0; 16]);
        let auth = auth_with(ess, lm, flags::UNICODE | flags::EXTENDED_SESSIONSECURITY);
        assert!(verify_v1(&auth, &NT_HASH_PASSWORD, &SERVER_CHALLENGE).is_ok());
        let mut wrong = auth.clone();
        wrong.lm_response[0] = 0xab;
        assert_eq!(
            verify_v1(&wrong, &NT_HASH_PASSWORD, &SERVER_CHALLENGE),
            Err(Mismatch::Response)
        );
    }

    fn exchange(unicode: bool, o: &client::Options<'_>) -> (Vec<u8>, Vec<u8>, Vec<u8>, [u8; 8]) {
        let neg = client::negotiate(unicode);
        let names = ServerNames {
            nb_domain: "EXAMPLE",
            nb_computer: "RELAY",
            dns_domain: "example.com",
            dns_computer: "relay.example.com",
        };
        let sc = [7u8; 8];
        let chal = challenge(
            &Negotiate::parse(&neg).expect("negotiate"),
            sc,
            &names,
            1_700_000_000,
        );
        let auth = client::authenticate(&neg, &chal, o);
        (neg, chal, auth, sc)
    }

    #[test]
    fn a_full_exchange_with_a_mic_verifies_and_tampering_is_caught() {
        for unicode in [true, false] {
            let o = client::Options {
                user: "alerts",
                domain: "EXAMPLE",
                password: "s3cret-Pass",
                v1: false,
                with_mic: true,
            };
            let (neg, chal, auth, sc) = exchange(unicode, &o);
            let parsed = Authenticate::parse(&auth).expect("authenticate");
            assert_eq!(
                (parsed.user.as_str(), parsed.domain.as_str()),
                ("alerts", "EXAMPLE")
            );
            assert_eq!(parsed.workstation, "WS1");
            assert!(parsed.has_mic());
            let hash = nt_hash_bytes(mailrelay_crds::verifier::nt_hash("s3cret-Pass").expose())
                .expect("NT hash");
            assert_eq!(verify(&parsed, &hash, &sc, &neg, &chal), Ok(()));
            // The CHALLENGE the client saw differs from the one the server sent: the MIC says so.
            let mut other_chal = chal.clone();
            let last = other_chal.len() - 5;
            other_chal[last] ^= 0xff;
            assert_eq!(
                verify(&parsed, &hash, &sc, &neg, &other_chal),
                Err(Mismatch::Mic)
            );
            let mut wrong = hash;
            wrong[3] ^= 0x10;
            assert_eq!(
                verify(&parsed, &wrong, &sc, &neg, &chal),
                Err(Mismatch::Response)
            );
        }
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        assert!(Negotiate::parse(b"NTLMSSP\0").is_err());
        assert!(Negotiate::parse(b"NTLMSSP\0\x03\0\0\0\0\0\0\0").is_err());
        assert!(Authenticate::parse(b"hello").is_err());
        let mut m = SIGNATURE.to_vec();
        m.extend_from_slice(&3u32.to_le_bytes());
        m.extend_from_slice(&[0xff; 60]);
        assert!(Authenticate::parse(&m).is_err());
        // Every truncation of a valid message fails cleanly.
        let o = client::Options {
            user: "u",
            domain: "D",
            password: "p",
            v1: false,
            with_mic: true,
        };
        let (_, _, auth, _) = exchange(true, &o);
        for n in 0..auth.len() {
            let _ = Authenticate::parse(&auth[..n]);
        }
    }
}
