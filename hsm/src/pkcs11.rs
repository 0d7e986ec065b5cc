//! PKCS#11 keys: P-256 key pairs generated inside a token (an HSM, a smart card,
//! SoftHSM2) through `cryptoki`. The private half is created `CKA_TOKEN`,
//! `CKA_PRIVATE`, `CKA_SENSITIVE` and not `CKA_EXTRACTABLE`, so it never leaves the
//! token; the server only ever holds object handles.
//!
//! Keys are found by `CKA_LABEL` = key id (`CKA_ID` carries the same bytes). Only a
//! private key with `CKA_PRIVATE` true counts (no one can make one without the PIN),
//! and its public half is the public key object with that label that verifies a
//! signature the private key makes when it is first looked up (public objects need
//! no PIN, so others with that label may exist).
//! Signing hashes the message with SHA-256 here and asks the token for `CKM_ECDSA`
//! over the digest, which returns fixed-width `r || s`; [`crate::fixed_to_der`]
//! converts it for X.509.
//!
//! Threads: the `Pkcs11` context is shared per module for the whole process (a
//! module can be `C_Initialize`d only once per process); PKCS#11 sessions are not
//! thread-safe, so each operation borrows a session from a small pool (opened on
//! demand, at most [`MAX_IDLE_SESSIONS`] kept idle). One extra session stays open
//! for the life of the manager: PKCS#11 login state belongs to the application
//! and lasts while any session to the token is open, so every pooled session is
//! logged in without the PIN being kept. The PIN is wiped as soon as `C_Login`
//! returns.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::{
    fixed_to_der, p256_spki_from_point, validate_key_id, Error, KeyAlgorithm, KeyManager,
    PublicKey, Result, SignatureFormat,
};

/// DER of the prime256v1 OID, as `CKA_EC_PARAMS` carries it.
const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Idle sessions kept for reuse; more are opened while more threads sign at once.
pub(crate) const MAX_IDLE_SESSIONS: usize = 16;

/// One `Pkcs11` context per module path for the process: `C_Initialize` may run
/// only once, and managers opened later (a restart in tests) share it.
fn context(module: &Path) -> Result<Pkcs11> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let module_err = |reason: String| Error::Pkcs11Module {
        path: module.display().to_string(),
        reason,
    };
    let canonical =
        std::fs::canonicalize(module).map_err(|e| module_err(format!("cannot open: {e}")))?;
    let mut map = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| Error::Crypto("lock poisoned"))?;
    if let Some(ctx) = map.get(&canonical) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(&canonical).map_err(|e| module_err(format!("cannot load: {e}")))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(module_err(format!("C_Initialize failed: {e}"))),
    }
    map.insert(canonical, ctx.clone());
    Ok(ctx)
}

fn ck_err(operation: &'static str) -> impl FnOnce(CkError) -> Error {
    move |e| Error::Pkcs11 {
        operation,
        reason: e.to_string(),
    }
}

/// A key found in the token: the private key's handle and the public half.
struct TokenKey {
    private: ObjectHandle,
    public: PublicKey,
}

/// Keys in a PKCS#11 token.
pub struct Pkcs11KeyManager {
    ctx: Pkcs11,
    slot: Slot,
    token_label: String,
    idle: Mutex<Vec<Session>>,
    keys: RwLock<HashMap<String, Arc<TokenKey>>>,
    /// Serialises generate and destroy so "exists?" and "create" do not race.
    admin: Mutex<()>,
    /// Keeps the user logged in (see the module docs). Declared last: dropped last.
    _login: Mutex<Session>,
}

impl std::fmt::Debug for Pkcs11KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11KeyManager")
            .field("token_label", &self.token_label)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Pkcs11KeyManager {
    /// Loads `module`, finds the token labelled `token_label` and logs in as the
    /// user with `pin`, which is wiped when this returns (whatever the outcome).
    pub fn open(module: &Path, token_label: &str, pin: Zeroizing<String>) -> Result<Self> {
        let ctx = context(module)?;
        let slot = find_token(&ctx, module, token_label)?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(ck_err("opening a session"))?;
        {
            // AuthPin is a secrecy::SecretString: zeroized on drop, like `pin`.
            let auth = AuthPin::new(pin.as_str().into());
            drop(pin);
            let login_err = |reason| Error::Login {
                token: token_label.to_string(),
                reason,
            };
            match session.login(UserType::User, Some(&auth)) {
                Ok(()) => {}
                // Another manager of this process is logged in to the same token.
                Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(CkError::Pkcs11(rv, _)) => {
                    return Err(login_err(match rv {
                        RvError::PinIncorrect => "the PIN is incorrect",
                        RvError::PinLocked => "the PIN is locked (too many wrong attempts)",
                        RvError::PinExpired => "the PIN has expired",
                        RvError::PinLenRange | RvError::PinInvalid => {
                            "the PIN has the wrong length or invalid characters"
                        }
                        RvError::UserPinNotInitialized => "the token's user PIN is not initialised",
                        RvError::UserTooManyTypes | RvError::UserAnotherAlreadyLoggedIn => {
                            "another user (the SO) is logged in to the token"
                        }
                        RvError::TokenNotPresent | RvError::DeviceRemoved => {
                            "the token was removed"
                        }
                        _ => "the token refused the login",
                    }))
                }
                Err(_) => return Err(login_err("the login call failed")),
            }
        }
        tracing::info!(
            token = token_label,
            %slot,
            module = %module.display(),
            "logged in to PKCS#11 token"
        );
        Ok(Self {
            ctx,
            slot,
            token_label: token_label.to_string(),
            idle: Mutex::new(Vec::new()),
            keys: RwLock::new(HashMap::new()),
            admin: Mutex::new(()),
            _login: Mutex::new(session),
        })
    }

    /// The label of the token this manager uses.
    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// Runs `f` on a pooled session.
    fn with_session<T>(&self, f: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        let pooled = self
            .idle
            .lock()
            .map_err(|_| Error::Crypto("lock poisoned"))?
            .pop();
        let session = match pooled {
            Some(s) => s,
            None => self
                .ctx
                .open_rw_session(self.slot)
                .map_err(ck_err("opening a session"))?,
        };
        let out = f(&session);
        // After a failure, pool the session again only if the module still knows it
        // (a closed session or a removed token would fail every later call).
        if out.is_ok() || session.get_session_info().is_ok() {
            let mut idle = self
                .idle
                .lock()
                .map_err(|_| Error::Crypto("lock poisoned"))?;
            if idle.len() < MAX_IDLE_SESSIONS {
                idle.push(session);
            }
        }
        out
    }

    fn find(session: &Session, class: ObjectClass, key_id: &str) -> Result<Vec<ObjectHandle>> {
        session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::KeyType(KeyType::EC),
                Attribute::Label(key_id.as_bytes().to_vec()),
            ])
            .map_err(ck_err("finding objects"))
    }

    /// The private keys labelled `key_id` that only a logged-in user can have made:
    /// `CKA_PRIVATE` true. A public private-key object can be created in a session
    /// that never logged in, by anyone who reaches the token without the PIN, and its
    /// value may be readable: it is never one of ours.
    fn find_private(session: &Session, key_id: &str) -> Result<Vec<ObjectHandle>> {
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(key_id.as_bytes().to_vec()),
            ])
            .map_err(ck_err("finding objects"))
    }

    /// Among the public key objects labelled `key_id` (public objects need no PIN to
    /// create, so some may be planted), the one that verifies a signature the private
    /// key makes now.
    fn matching_public(
        session: &Session,
        key_id: &str,
        private: ObjectHandle,
    ) -> Result<PublicKey> {
        use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
        const CHALLENGE: &[u8] = b"ztid-hsm: does this public key belong to this private key?";
        let digest = ring::digest::digest(&ring::digest::SHA256, CHALLENGE);
        let sig = session
            .sign(&Mechanism::Ecdsa, private, digest.as_ref())
            .map_err(ck_err("signing the key pairing check"))?;
        for handle in Self::find(session, ObjectClass::PUBLIC_KEY, key_id)? {
            let Ok(public) = Self::public_of(session, key_id, handle) else {
                continue;
            };
            if UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &public.raw)
                .verify(CHALLENGE, &sig)
                .is_ok()
            {
                return Ok(public);
            }
        }
        Err(Error::Corrupt {
            id: key_id.to_string(),
            reason: "no public key object in the token belongs to the private key".into(),
        })
    }

    fn public_of(session: &Session, key_id: &str, handle: ObjectHandle) -> Result<PublicKey> {
        let attrs = session
            .get_attributes(handle, &[AttributeType::EcParams, AttributeType::EcPoint])
            .map_err(ck_err("reading the public key"))?;
        let corrupt = |reason: &str| Error::Corrupt {
            id: key_id.to_string(),
            reason: reason.to_string(),
        };
        let mut params = None;
        let mut point = None;
        for a in attrs {
            match a {
                Attribute::EcParams(p) => params = Some(p),
                Attribute::EcPoint(p) => point = Some(p),
                _ => {}
            }
        }
        if params.as_deref() != Some(&P256_EC_PARAMS[..]) {
            return Err(corrupt("not a P-256 key"));
        }
        let point = point.ok_or_else(|| corrupt("public key has no CKA_EC_POINT"))?;
        let raw = ec_point_from_attribute(&point)
            .ok_or_else(|| corrupt("CKA_EC_POINT is not an uncompressed P-256 point"))?
            .to_vec();
        Ok(PublicKey {
            algorithm: KeyAlgorithm::EcdsaP256,
            spki_der: p256_spki_from_point(&raw)?,
            raw,
        })
    }

    /// Finds `key_id` in the token (cached: handles of token objects stay valid for the process).
    fn load(&self, key_id: &str) -> Result<Arc<TokenKey>> {
        validate_key_id(key_id)?;
        if let Some(k) = self
            .keys
            .read()
            .map_err(|_| Error::Crypto("lock poisoned"))?
            .get(key_id)
        {
            return Ok(k.clone());
        }
        let key = self.with_session(|s| {
            let private = match Self::find_private(s, key_id)?[..] {
                [] => return Err(Error::NotFound(key_id.to_string())),
                [h] => h,
                _ => {
                    return Err(Error::Corrupt {
                        id: key_id.to_string(),
                        reason: "several private keys carry this label".into(),
                    })
                }
            };
            let public = Self::matching_public(s, key_id, private)?;
            Ok(TokenKey { private, public })
        })?;
        let key = Arc::new(key);
        self.keys
            .write()
            .map_err(|_| Error::Crypto("lock poisoned"))?
            .insert(key_id.to_string(), key.clone());
        Ok(key)
    }

    fn forget(&self, key_id: &str) {
        if let Ok(mut keys) = self.keys.write() {
            keys.remove(key_id);
        }
    }
}

/// The token's `CKA_EC_POINT`: a DER OCTET STRING holding the point (as the
/// standard says), or the bare point (as some modules return it).
fn ec_point_from_attribute(value: &[u8]) -> Option<&[u8]> {
    match value {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 && rest.first() == Some(&0x04) => Some(rest),
        [0x04, ..] if value.len() == 65 => Some(value),
        _ => None,
    }
}

fn find_token(ctx: &Pkcs11, module: &Path, label: &str) -> Result<Slot> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(ck_err("listing slots"))?;
    let mut present = Vec::new();
    let mut found = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(ck_err("reading token info"))?;
        if !info.token_initialized() {
            continue;
        }
        let l = info.label().trim_end().to_string();
        if l == label {
            found.push(slot);
        }
        present.push(format!("{l:?}"));
    }
    match found[..] {
        [slot] => Ok(slot),
        [] => Err(Error::TokenNotFound {
            label: label.to_string(),
            module: module.display().to_string(),
            present: if present.is_empty() {
                "none".into()
            } else {
                present.join(", ")
            },
        }),
        [slot, ..] => {
            tracing::warn!(
                token = label,
                %slot,
                count = found.len(),
                "several tokens carry this label; using the first"
            );
            Ok(slot)
        }
    }
}

impl KeyManager for Pkcs11KeyManager {
    fn generate(&self, key_id: &str, algorithm: KeyAlgorithm) -> Result<PublicKey> {
        validate_key_id(key_id)?;
        let KeyAlgorithm::EcdsaP256 = algorithm;
        let _admin = self
            .admin
            .lock()
            .map_err(|_| Error::Crypto("lock poisoned"))?;
        let key = self.with_session(|s| {
            // Any object under the label, ours or not, makes the id taken.
            let taken = s
                .find_objects(&[Attribute::Label(key_id.as_bytes().to_vec())])
                .map_err(ck_err("finding objects"))?;
            if !taken.is_empty() {
                return Err(Error::AlreadyExists(key_id.to_string()));
            }
            let label = key_id.as_bytes().to_vec();
            let public_template = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::EcParams(P256_EC_PARAMS.to_vec()),
                Attribute::Label(label.clone()),
                Attribute::Id(label.clone()),
            ];
            let private_template = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Derive(false),
                Attribute::Label(label.clone()),
                Attribute::Id(label),
            ];
            let (public, private) = s
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &public_template,
                    &private_template,
                )
                .map_err(ck_err("generating a P-256 key pair"))?;
            let public = match Self::public_of(s, key_id, public) {
                Ok(p) => p,
                Err(e) => {
                    // Leave nothing half-made behind.
                    let _ = s.destroy_object(private);
                    let _ = s.destroy_object(public);
                    return Err(e);
                }
            };
            Ok(TokenKey { private, public })
        })?;
        let public = key.public.clone();
        self.keys
            .write()
            .map_err(|_| Error::Crypto("lock poisoned"))?
            .insert(key_id.to_string(), Arc::new(key));
        tracing::info!(key_id, backend = "pkcs11", token = %self.token_label, "generated signing key in the token");
        Ok(public)
    }

    fn public_key(&self, key_id: &str) -> Result<PublicKey> {
        Ok(self.load(key_id)?.public.clone())
    }

    fn sign(&self, key_id: &str, message: &[u8], format: SignatureFormat) -> Result<Vec<u8>> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        let mut retried = false;
        let fixed = loop {
            let key = self.load(key_id)?;
            let out = self.with_session(|s| {
                s.sign(&Mechanism::Ecdsa, key.private, digest.as_ref())
                    .map_err(|e| match e {
                        // A cached handle that went stale (the object was destroyed
                        // and re-created by another application): look it up again.
                        CkError::Pkcs11(
                            RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid,
                            _,
                        ) => Error::NotFound(key_id.to_string()),
                        e => ck_err("signing")(e),
                    })
            });
            match out {
                Err(Error::NotFound(_)) if !retried => {
                    retried = true;
                    self.forget(key_id);
                }
                other => break other?,
            }
        };
        if fixed.len() != 64 {
            return Err(Error::Crypto(
                "the token returned a signature of the wrong size",
            ));
        }
        match format {
            SignatureFormat::Fixed => Ok(fixed),
            SignatureFormat::Der => fixed_to_der(&fixed),
        }
    }

    fn list(&self) -> Result<Vec<String>> {
        let mut ids = self.with_session(|s| {
            let handles = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::Token(true),
                    Attribute::Private(true),
                ])
                .map_err(ck_err("finding objects"))?;
            let mut ids = Vec::new();
            for h in handles {
                let attrs = s
                    .get_attributes(h, &[AttributeType::Label])
                    .map_err(ck_err("reading a key label"))?;
                for a in attrs {
                    if let Attribute::Label(l) = a {
                        // Keys of other applications may share the token: only
                        // labels that are valid key ids are ours to report.
                        if let Ok(id) = String::from_utf8(l) {
                            if validate_key_id(&id).is_ok() {
                                ids.push(id);
                            }
                        }
                    }
                }
            }
            Ok(ids)
        })?;
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    fn destroy(&self, key_id: &str) -> Result<()> {
        validate_key_id(key_id)?;
        let _admin = self
            .admin
            .lock()
            .map_err(|_| Error::Crypto("lock poisoned"))?;
        self.forget(key_id);
        self.with_session(|s| {
            let mut objects = Self::find_private(s, key_id)?;
            if objects.is_empty() {
                return Err(Error::NotFound(key_id.to_string()));
            }
            // Private half first: once it is gone the key cannot sign, whatever follows.
            objects.extend(Self::find(s, ObjectClass::PUBLIC_KEY, key_id)?);
            for h in objects {
                s.destroy_object(h)
                    .map_err(ck_err("destroying a key object"))?;
            }
            Ok(())
        })?;
        tracing::info!(key_id, backend = "pkcs11", token = %self.token_label, "destroyed signing key in the token");
        Ok(())
    }

    fn backend_name(&self) -> &'static str {
        "pkcs11"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_point_attribute_forms() {
        let mut point = vec![0x04u8];
        point.extend([9u8; 64]);
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend(&point);
        assert_eq!(ec_point_from_attribute(&wrapped), Some(&point[..]));
        assert_eq!(ec_point_from_attribute(&point), Some(&point[..]));
        assert_eq!(ec_point_from_attribute(&wrapped[..66]), None);
        assert_eq!(ec_point_from_attribute(&[0x03; 65]), None);
    }
}
