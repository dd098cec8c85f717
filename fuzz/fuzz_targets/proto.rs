//! The guest protocol (`hangar_proto`): one line from the agent channel. Lines from a guest
//! (`GuestMessage`, read by the host from a VM it does not trust) and from a host
//! (`HostMessage`, read by hangar-init) decode to a message or an error, never a panic; a
//! decoded message encodes to one line that decodes to the same message.
#![no_main]

use hangar_proto::{GuestMessage, HostMessage, decode, encode};
use libfuzzer_sys::fuzz_target;

fn round_trip<T>(line: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(message) = decode::<T>(line) else {
        return;
    };
    let encoded = encode(&message);
    assert!(encoded.ends_with('\n'));
    assert!(
        !encoded[..encoded.len() - 1].contains('\n'),
        "one message, one line: {encoded:?}"
    );
    let again: T = decode(&encoded).expect("an encoded message decodes");
    assert_eq!(again, message);
}

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    round_trip::<GuestMessage>(line);
    round_trip::<HostMessage>(line);
});
