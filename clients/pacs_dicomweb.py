"""The PACS side of `braintumor pacs`, over DICOMweb (dicomweb-client): find MR series with QIDO-RS, list and fetch
their instances with WADO-RS, ask which of our results are already stored, store results with STOW-RS.

Every call is synchronous (requests); the command runs them in worker threads. Errors are reported as
:class:`PacsError` with the HTTP status and the operation, never the URL (it holds study UIDs) nor response bodies."""

from __future__ import annotations

import io
from dataclasses import dataclass

# DICOM JSON tags (PS3.18 F.2) of the attributes the searches return.
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, SERIES_DESCRIPTION, SERIES_NUMBER, INSTANCE_NUMBER = "00080060", "0008103E", "00200011", "00200013"


class PacsError(RuntimeError):
    """A DICOMweb call failed: ``operation`` (search, fetch, store) and the HTTP ``status`` (None: no answer)."""

    def __init__(self, operation: str, status: int | None, reason: str) -> None:
        self.operation, self.status = operation, status
        super().__init__(f"DICOMweb {operation} failed: " + (f"HTTP {status} {reason}" if status else reason))


@dataclass(frozen=True)
class Series:
    study_uid: str
    series_uid: str
    description: str
    number: int | None


def _value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def _fail(operation: str, exc: Exception) -> PacsError:
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return PacsError(operation, exc.response.status_code, exc.response.reason or "")
    if isinstance(exc, requests.RequestException):
        return PacsError(operation, None, type(exc).__name__)  # not str(exc): it quotes the URL
    return PacsError(operation, None, f"{type(exc).__name__}")


class DicomWeb:
    """A DICOMweb service at ``url`` (Orthanc: ``http://host:8042/dicom-web``), with HTTP basic auth (``user``,
    ``password``) or a bearer ``token``. ``retries``: attempts after a refused connection or a 429/503/504 answer
    (dicomweb-client's exponential back-off from 0.5 s)."""

    def __init__(self, url: str, *, user: str | None = None, password: str | None = None, token: str | None = None,
                 timeout: float = 60.0, retries: int = 3) -> None:
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session, create_session_from_user_pass

        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--dicomweb {url}: expected an http:// or https:// DICOMweb base URL "
                             "(Orthanc: http://127.0.0.1:8042/dicom-web)")
        session = create_session_from_user_pass(user, password or "") if user else create_session()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.client = DICOMwebClient(url, session=session, headers=headers, timeout=timeout)
        self.client.set_http_retry_params(retry=retries > 0, max_attempts=retries + 1, wait_exponential_multiplier=250)

    def find_series(self, *, modality: str = "MR", study_date: str | None = None,
                    series_description: str | None = None, study_uid: str | None = None) -> list[Series]:
        """QIDO-RS series search; ``study_date`` is ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD``,
        ``series_description`` may hold ``*`` and ``?`` wildcards."""
        filters = {"Modality": modality}
        if study_date:
            filters["StudyDate"] = study_date
        if series_description:
            filters["SeriesDescription"] = series_description
        try:
            found = self.client.search_for_series(study_instance_uid=study_uid, search_filters=filters,
                                                  fields=["SeriesDescription", "SeriesNumber"], get_remaining=True)
        except Exception as exc:  # noqa: BLE001 - any failure of the search is reported the same way
            raise _fail("search for series", exc) from exc
        out = []
        for item in found:
            number = _value(item, SERIES_NUMBER)
            out.append(Series(_value(item, STUDY_UID), _value(item, SERIES_UID),
                              str(_value(item, SERIES_DESCRIPTION) or ""), int(number) if number is not None else None))
        return sorted(out, key=lambda s: (s.study_uid, s.number if s.number is not None else 0, s.series_uid))

    def instances(self, study_uid: str, series_uid: str) -> list[str]:
        """SOP Instance UIDs of a series, in instance-number order (QIDO-RS)."""
        try:
            found = self.client.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                                     fields=["InstanceNumber"], get_remaining=True)
        except Exception as exc:  # noqa: BLE001
            raise _fail("search for instances", exc) from exc

        def order(item):
            number = _value(item, INSTANCE_NUMBER)
            return (int(number) if number is not None else 0, _value(item, SOP_UID))

        return [_value(item, SOP_UID) for item in sorted(found, key=order)]

    def stored(self, study_uid: str, series_uid: str) -> set[str]:
        """The instances of one of our result series already in the PACS (empty when the series is not there)."""
        try:
            found = self.client.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                                     get_remaining=True)
        except Exception as exc:  # noqa: BLE001
            error = _fail("search for stored results", exc)
            if error.status == 404:  # some servers answer an empty search so
                return set()
            raise error from exc
        return {_value(item, SOP_UID) for item in found}

    def fetch(self, study_uid: str, series_uid: str, sop_uid: str):
        """One instance as a pydicom dataset and as Part 10 bytes (WADO-RS, in the transfer syntax the PACS has)."""
        try:
            ds = self.client.retrieve_instance(study_uid, series_uid, sop_uid,
                                               media_types=(("application/dicom", "*"),))
        except Exception as exc:  # noqa: BLE001
            raise _fail("fetch instance", exc) from exc
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return ds, buf.getvalue()

    def store(self, datasets: list, study_uid: str) -> None:
        """STOW-RS; a response that lists a failed SOP instance is an error."""
        try:
            response = self.client.store_instances(datasets=datasets, study_instance_uid=study_uid)
        except Exception as exc:  # noqa: BLE001
            raise _fail("store results", exc) from exc
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise PacsError("store results", None, f"{len(failed)} instances refused (failure reasons {reasons})")
