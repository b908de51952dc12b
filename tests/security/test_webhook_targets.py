"""Which webhook URLs the service accepts."""

from __future__ import annotations

import pytest

from service.webhooks import WebhookUrlError, check_url


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com:65536/x",
        "http://hooks.example.com:99999999999/x",
        "http://hooks.example.com:0/x",
        "http://hooks.example.com:-1/x",
        "http://hooks.example.com:http/x",
        "https://[2606:4700:4700::1111]:70000/x",
    ],
)
def test_a_port_outside_1_to_65535_is_refused_before_any_lookup(url: str) -> None:
    for allow_private in (False, True):
        with pytest.raises(WebhookUrlError, match="port must be a number in 1-65535"):
            check_url(url, allow_private)
