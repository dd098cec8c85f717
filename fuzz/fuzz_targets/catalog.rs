//! The catalog parser (`hangar_core::Catalog::from_toml`): whatever TOML an operator (or a
//! file someone else wrote) gives it, it answers a catalog or a `CatalogError`, never a
//! panic; a catalog it accepts answers lookups by every name it lists.
#![no_main]

use hangar_core::Catalog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(catalog) = Catalog::from_toml(text) else {
        return;
    };
    let names: Vec<String> = catalog.names().map(str::to_owned).collect();
    for name in &names {
        let service = catalog.get(name).expect("a listed service is found");
        assert_eq!(&service.name, name);
        for port in &service.ports {
            assert!(!port.name.is_empty());
        }
    }
    let _ = hangar_core::suggest::closest("http-countr", catalog.names(), 3);
});
