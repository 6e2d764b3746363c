"""Job forms built from the catalog: `job_form.JobForm`, its widgets (`widgets`, `adapter_picker`) and the
values in and out of them (`values`)."""
