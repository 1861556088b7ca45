"""The station: sensor capture -> preprocess -> inference -> scoring -> decision -> publish."""
