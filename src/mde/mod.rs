//! Microsoft Defender for Endpoint API client.
