//! The control protocol's decoder: any line gives a request or the response refusing it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rlagent::control::protocol::{parse_request, request_line};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(request) = parse_request(line) {
        // What decodes encodes and decodes to the same request.
        let again = request_line(&request);
        assert_eq!(parse_request(again.trim_end()).ok(), Some(request));
    }
});
