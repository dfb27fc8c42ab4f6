"""MFU peaks: device names as torch reports them map to their own bf16 dense peak, unknown
names (and MIG slices) to None."""

import pytest

from lorytrain.model.flops import normalise_device_name, peak_bf16_flops

# names as `torch.cuda.get_device_name` reports them on each card, and the datasheet peak
DEVICES = {
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.05,
    "NVIDIA L40": 181.05,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA GeForce RTX 4090": 165.2,
    "AMD Instinct MI300X": 1307.4,
}


@pytest.mark.parametrize("name,tflops", DEVICES.items())
def test_known_devices_get_their_own_peak(name, tflops):
    assert peak_bf16_flops(name) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", [
    "NVIDIA A10G",  # not an A10: no substring matches
    "NVIDIA A100X",
    "NVIDIA GeForce RTX 4090 D",
    "NVIDIA H100 80GB HBM3 MIG 1g.10gb",  # a slice owns a fraction of the SMs
    "Tesla V100-SXM2-16GB",
    "cpu",
    "",
])
def test_unknown_devices_get_no_peak(name):
    assert peak_bf16_flops(name) is None


def test_names_normalise_without_vendor_and_memory():
    assert normalise_device_name("NVIDIA A100-SXM4-80GB") == "A100 SXM4"
    assert normalise_device_name("NVIDIA H100 80GB HBM3") == "H100"
    assert normalise_device_name("nvidia h100 pcie") == "H100 PCIE"
