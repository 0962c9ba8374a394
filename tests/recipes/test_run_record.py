"""`recipes.common.run_record.machine`: what a run records of the host it ran on."""

from recipes.common.run_record import machine

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 8
cpu MHz\t\t: 2099.998

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: another processor
cpu MHz\t\t: 800.000
"""


def test_machine_names_a_bare_virtual_processor_by_its_family_model_stepping_and_clock():
    record = machine(CPUINFO)
    assert record["cpu"] == "Intel(R) Xeon(R) Processor"  # the first processor's block, not the last one's
    assert record["cpu_id"] == "GenuineIntel family 6 model 143 stepping 8" and record["cpu_mhz"] == 2100
    assert record["cpu_count"] >= 1 and "gpu" in record


def test_machine_without_cpuinfo_records_the_platform_name_alone():
    record = machine("")
    assert record["cpu"] and "cpu_id" not in record and "cpu_mhz" not in record
